"""convfactor evaluate MODEL --data builtin|PATH: PSNR/SSIM (SR, denoising) or accuracy (classification)."""
from __future__ import annotations

import json
from pathlib import Path

from .. import io, models
from ..data import classification
from ..data.images import builtin_images
from ..data.sr import IMAGE_EXTENSIONS, SRFolder, read_image
from ..measure import quality
from .common import add_model_arguments, load_model

HELP = ("measure PSNR/SSIM (super-resolution, denoising; with the bicubic / noisy-input baseline) or "
        "top-1/top-5 accuracy (classification) on the built-in held-out photos or a data folder")


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--data", default="builtin",
                   help="'builtin' (scikit-image photos, held-out split) or a folder: SR layouts (HR/, "
                        "DIV2K_*_HR/, GTmod12/, image_SRF_s/, or images), images for denoising, CIFAR-10 "
                        "python batches or an ImageFolder tree for classification")
    p.add_argument("--task", choices=["sr", "denoise", "classification"],
                   help="default: the built-in model's own task")
    p.add_argument("--scale", type=int, help="SR scale (default: the model's)")
    p.add_argument("--sigma", type=float, default=25.0, help="denoising noise level on the 0-255 scale (default 25)")
    p.add_argument("--split", default="test", choices=["test", "train", "all"],
                   help="which built-in images (default: the held-out test split)")
    p.add_argument("--seed", type=int, default=0, help="noise seed for denoising")
    p.add_argument("--batch-size", type=int, default=256, help="classification batch size")
    p.add_argument("--max-side", type=int, help="centre-crop SR/denoising images to at most this many pixels per "
                                                "side (quick runs; default: full images)")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--no-baseline", action="store_true", help="skip the bicubic / noisy-input baseline")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    base = io.base_model_of(args.model)
    info = models.info(base) if base else {}
    task = args.task or info.get("task")
    if task not in ("sr", "denoise", "classification"):
        raise ValueError("cannot tell the task of this model; pass --task sr|denoise|classification")
    scale = args.scale or info.get("scale")
    if task == "sr" and not scale:
        raise ValueError("pass --scale for this SR model")
    if args.data != "builtin" and not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data} does not exist")
    if task == "classification" and args.data == "builtin":
        raise ValueError("there is no built-in classification set; pass --data with CIFAR-10 python batches "
                         "or an ImageFolder tree")
    model, example = load_model(args)
    baseline = not args.no_baseline
    if task == "sr":
        data = _images(args) if args.data == "builtin" else _sr_folder(args, scale)
        if args.max_side or args.limit:
            if not isinstance(data, list):  # an SRFolder: read only the images that are used
                n = min(len(data), args.limit or len(data))
                data = [(data.names[i], *data.pair(i)) for i in range(n)]
            data = _trim(args, data, scale)
        res = quality.evaluate_sr(model, data, scale, baseline=baseline, progress=not args.json)
    elif task == "denoise":
        grey = example.shape[1] == 1
        res = quality.evaluate_denoise(model, _trim(args, _images(args), 1), args.sigma, grey=grey, seed=args.seed,
                                       baseline=baseline, progress=not args.json)
    else:
        res = quality.evaluate_classification(model, _classification(args), batch_size=args.batch_size,
                                              progress=not args.json)
    res = {"model": args.model, "task": task, "data": args.data, **({"scale": scale} if task == "sr" else {}),
           **({"sigma": args.sigma} if task == "denoise" else {}), **res}
    print(json.dumps(res, indent=2) if args.json else format_result(res))
    return 0


def _images(args):
    if args.data == "builtin":
        return builtin_images(args.split)
    root = Path(args.data)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if root.is_dir() else [root]
    if not files:
        raise FileNotFoundError(f"{root} holds no images")
    return [(f.stem, read_image(f)) for f in files]


def _trim(args, items: list, scale: int) -> list:
    """First ``--limit`` items, each image centre-cropped to ``--max-side`` (LR/HR crops kept aligned)."""
    items = items[: args.limit] if args.limit else list(items)
    if not args.max_side:
        return items
    if args.max_side < 2 * scale:
        raise ValueError(f"--max-side must be at least {2 * scale}")
    out = []
    for name, *arrays in items:
        hr = arrays[-1]
        h, w = (min(hr.shape[0], args.max_side) // scale * scale, min(hr.shape[1], args.max_side) // scale * scale)
        y, x = (hr.shape[0] - h) // 2 // scale * scale, (hr.shape[1] - w) // 2 // scale * scale
        crop = [hr[y: y + h, x: x + w]]
        if len(arrays) == 2:  # (lr, hr): the matching LR window
            lr = arrays[0]
            crop.insert(0, lr[y // scale: (y + h) // scale, x // scale: (x + w) // scale])
        out.append((name, *crop))
    return out


def _sr_folder(args, scale):
    return SRFolder(args.data, scale)


def _classification(args):
    root = Path(args.data)
    try:
        return classification.cifar10(root, train=False)
    except FileNotFoundError as exc:
        if "CIFAR-10 python batches" not in str(exc):
            raise
    return classification.image_folder(root)


def format_result(res: dict) -> str:
    lines = [f"model: {res['model']}   task: {res['task']}   data: {res['data']}"
             + (f"   scale: x{res['scale']}" if "scale" in res else "")
             + (f"   sigma: {res['sigma']:g}" if "sigma" in res else "")]
    if res["task"] == "classification":
        lines.append(f"images: {res['n']}   " + "   ".join(f"{k}: {v:.2f}%" for k, v in res.items()
                                                         if k.startswith("top")))
        return "\n".join(lines)
    base = "bicubic" if res["task"] == "sr" else "noisy"
    has_base = f"{base}_psnr" in res
    head = f"{'image':<24} {'PSNR':>8} {'SSIM':>7}" + (f" {base + ' PSNR':>13} {base + ' SSIM':>13}" if has_base else "")
    lines += [head, "-" * len(head)]
    for r in res["images"] + [{"name": "mean", **res}]:
        line = f"{r['name']:<24} {r['psnr']:8.3f} {r['ssim']:7.4f}"
        if has_base:
            line += f" {r[base + '_psnr']:13.3f} {r[base + '_ssim']:13.4f}"
        lines.append(line)
    metric = "PSNR-Y" if res["task"] == "sr" else "PSNR"
    if has_base:
        lines.append(f"{metric} gain over {base}: {res['psnr'] - res[base + '_psnr']:+.3f} dB")
    return "\n".join(lines)
