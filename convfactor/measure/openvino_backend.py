"""The ``openvino`` timing back-end: a model compiled by OpenVINO's CPU plugin (see
:mod:`convfactor.openvino_runtime` for the configuration, the int8 path and the preloaded-allocator
abort it avoids).  One module plus one line in :data:`convfactor.measure.backends.BACKENDS`."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import openvino_runtime
from ..utils import cpu_has
from .backends import Runnable, TimingBackend

__all__ = ["OpenVinoBackend"]


@dataclass
class OpenVinoBackend(TimingBackend):
    """OpenVINO CPU, LATENCY hint, ``threads`` inference threads, at ``precision`` (fp32, bf16, or NNCF
    int8 calibrated on ``calibration``: input arrays, default the example input alone)."""

    threads: int | None = None
    precision: str = "fp32"
    calibration: tuple = ()
    name: ClassVar[str] = "openvino"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "int8")
    own_layout: ClassVar[bool] = True

    def __post_init__(self):
        openvino_runtime.openvino()             # the one-line error when it is not installed
        self.check_precision()

    def channel_multiple(self) -> int:
        """OpenVINO's CPU plugin runs convs in blocked layouts: 16 channels with AVX-512, 8 with AVX2."""
        return 16 if cpu_has("avx512f") else 8

    def runtime_version(self) -> str:
        return f"openvino {openvino_runtime.version()}"

    def deployed(self, model, example):
        return openvino_runtime.OpenVinoModule(copy.deepcopy(model).eval(), example, threads=self.threads,
                                               precision=self.precision,
                                               calibration=list(self.calibration) or None)

    def output(self, runnable: Runnable) -> torch.Tensor:
        result = runnable.call()
        return torch.from_numpy(result[runnable.module.output(0)].copy()).float()

    def prepare(self, model, inputs):
        if len(inputs) != 1:
            return {self.key: "the openvino back-end takes models with one input tensor"}
        t0 = time.perf_counter()
        compiled = openvino_runtime.compile_ov(copy.deepcopy(model).eval(), inputs[0], threads=self.threads,
                                               precision=self.precision, calibration=list(self.calibration) or None)
        request = compiled.create_infer_request()
        feed = {0: inputs[0].detach().cpu().numpy()}
        threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))
        return {self.key: Runnable(self.key, lambda: request.infer(feed, share_inputs=True), compiled, inputs,
                                   setup_s=time.perf_counter() - t0,
                                   info={"inference_threads": threads, "hint": "LATENCY", **self.describe()})}
