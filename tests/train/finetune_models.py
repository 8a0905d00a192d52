"""Tiny models for the ``finetune`` command's tests, named on its command line as
``finetune_models:FACTORY`` (the tests put this folder on ``sys.path``); and :func:`press_ctrl_c`."""
import signal

from torch import nn


def sr_x2() -> nn.Module:
    """A 3-channel x2 super-resolution net: one conv, then a pixel shuffle."""
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.PixelShuffle(2))


def denoiser_rgb() -> nn.Module:
    """A 3-channel denoiser (output the shape of its input)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))


def denoiser_grey() -> nn.Module:
    """A 1-channel denoiser."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))


def press_ctrl_c() -> None:
    """What the OS does on Ctrl-C, minus the OS: call the SIGINT handler in place (the held-step handler
    while training, else Python's default, which raises KeyboardInterrupt).  A real signal raised inside
    a shared test worker could reach a handler a native library installed; the real-process test sends
    one from outside (tests/train/test_finetune_cli_checks.py)."""
    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
