"""convfactor.files is a leaf: writing a checkpoint, a plan or a report loads no model format,
compression or method code; and what it writes follows the user's umask."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from convfactor.files import atomic_write, temporary_sibling_dir

HEAVY = ("convfactor.compression", "convfactor.methods", "convfactor.io", "convfactor.rank")


@pytest.mark.parametrize("module", ["convfactor.files", "convfactor.train.checkpoint"])
def test_file_helpers_load_no_compression_or_methods(module):
    code = (f"import sys, {module}\n"
            "print('\\n'.join(m for m in sys.modules if m.startswith('convfactor')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert module in loaded                                   # the probe really imported it
    assert [m for m in loaded if m.startswith(HEAVY)] == []


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_and_dirs_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write(tmp_path / "report.md", "x")
        made = temporary_sibling_dir(tmp_path / "model")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(made.stat().st_mode) == 0o777 & ~mask
    assert made.parent == tmp_path and list(made.iterdir()) == []
