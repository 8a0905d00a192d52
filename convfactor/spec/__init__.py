"""Layer 1, what a convolution is: :class:`ConvSpec` (every conv option, handled once),
:func:`make_conv` (a piece of a factorized chain carrying those options) and im2col + GEMM."""
from .convspec import ConvSpec, UnsupportedLayer, conv_of, is_conv, make_conv

__all__ = ["ConvSpec", "UnsupportedLayer", "conv_of", "is_conv", "make_conv"]
