"""Published low-rank operating points, as reference marks for the speed / quality frontier figure.

They are measured on other networks and data than ours and none of them is a measured speed-up, so
each label says what its ``x`` is (a parameter ratio), and a point with no figure for the x axis
has ``x = None`` (drawn as a horizontal line at its loss).  ``loss`` is in dB of PSNR (negative: a
gain).
"""
from __future__ import annotations

__all__ = ["SR_REFERENCES"]

#: Li et al., "Learning Filter Basis for Convolutional Neural Network Compression", ICCV 2019, Table 2
#: (EDSR, 13.9% of the parameters, 0.09 dB lost, DIV2K training, Set5-B100-Urban100 tests); Sedky & Hosmer
#: (ESRGAN, their Table 1: 23.27 dB original, 23.31 with SVD, 22.99 with CP; speed only "slightly" better).
SR_REFERENCES = (
    {"label": "Li et al. 2019, EDSR: x = params reduction 7.2x (not speed), other data", "x": 1 / 0.139, "loss": 0.09},
    {"label": "Sedky & Hosmer, ESRGAN + SVD (no speed figure), other data", "x": None, "loss": 23.27 - 23.31},
    {"label": "Sedky & Hosmer, ESRGAN + CP (no speed figure), other data", "x": None, "loss": 23.27 - 22.99},
)
