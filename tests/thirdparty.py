"""Third-party model libraries for the tests and the compatibility matrix.

On these machines the registry's torchvision is a CUDA build whose compiled ops do not load next
to the local CPU torch, so ``import torchvision`` (and timm and spandrel, which import it) fails
with ``operator torchvision::nms does not exist``.  The library itself handles this
(:func:`convfactor.models.thirdparty.import_library` defines the missing op *schemas*, no kernels,
and notes it on stderr); :func:`load` does the same with the library's own schema list
(``TORCHVISION_SCHEMAS``) but silently, so a test that checks a command's stderr is not disturbed
by the note.  A model that really calls a detection op (nms, roi_align, ...) still fails loudly;
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

from convfactor.models.thirdparty import define_torchvision_standins, torchvision_ops_missing


def _import_torchvision():
    """``import torchvision``; where its compiled ops are missing, define their schemas and retry."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if not torchvision_ops_missing(exc):
            raise
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]                     # the failed import left half-initialised modules
    define_torchvision_standins()
    return importlib.import_module("torchvision")


def load(name: str):
    """Import ``torchvision``, ``timm`` or ``spandrel``, defining torchvision's op schemas first when its
    compiled library is missing; skips the calling test when the package is not installed."""
    if importlib.util.find_spec(name) is None or importlib.util.find_spec("torchvision") is None:
        pytest.skip(f"{name} is not installed (pip install 'convfactor[thirdparty]')")
    _import_torchvision()
    return importlib.import_module(name)
