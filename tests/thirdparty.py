"""Third-party model libraries for the tests and the compatibility matrix (not for users).

On these machines the registry's torchvision is a CUDA build whose compiled ops do not load next
to the local CPU torch, so ``import torchvision`` (and timm and spandrel, which import it) fails
with ``operator torchvision::nms does not exist``.  The model definitions are pure Python: defining
the missing op *schemas* with ``torch.library`` before the import lets them load.  No kernel is
defined, so a model that really calls a detection op (nms, roi_align, ...) still fails loudly;
classification, segmentation and SR models never call them.  On a normal install, where the
versions match, :func:`load` imports the real libraries and defines nothing.

Usage in a test::

    thirdparty = pytest.importorskip("thirdparty")   # tests/ is on sys.path
    torchvision = thirdparty.load("torchvision")       # skips the test if it is not installed
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch

#: torchvision's operator schemas (from its C++ registrations), defined only when its library is absent
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
    "SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
_LIBRARY: list = []          # keeps the torch.library.Library alive once defined


def _import_torchvision():
    """``import torchvision``; where its compiled ops are missing, define their schemas and retry."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "torchvision::" not in str(exc) or _LIBRARY:
            raise
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]                     # the failed import left half-initialised modules
    lib = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        lib.define(schema)
    _LIBRARY.append(lib)
    return importlib.import_module("torchvision")


def load(name: str):
    """Import ``torchvision``, ``timm`` or ``spandrel``, defining torchvision's op schemas first when its
    compiled library is missing; skips the calling test when the package is not installed."""
    if importlib.util.find_spec(name) is None or importlib.util.find_spec("torchvision") is None:
        pytest.skip(f"{name} is not installed (pip install 'convfactor[thirdparty]')")
    _import_torchvision()
    return importlib.import_module(name)
