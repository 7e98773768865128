"""SVD layers: one module per layer kind, all subclasses of `SVDLayer`."""
from .base import SVDLayer, cached, require_finite, svd_layers
from .conv import SVDConv2d, conv_spec, explicit_padding
from .linear import SVDLinear

__all__ = ["SVDConv2d", "SVDLayer", "SVDLinear", "cached", "conv_spec", "explicit_padding",
           "require_finite", "svd_layers"]
