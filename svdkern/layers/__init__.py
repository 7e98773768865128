"""SVD layers: one module per layer kind, all subclasses of `SVDLayer`."""
from .base import SVDLayer, cached, require_finite, svd_layers
from .conv import SVDConv2d, conv_spec
from .linear import SVDLinear
from .transformers_conv1d import SVDConv1D, is_conv1d

__all__ = ["SVDConv1D", "SVDConv2d", "SVDLayer", "SVDLinear", "is_conv1d", "cached", "conv_spec",
           "require_finite", "svd_layers"]
