"""SVD layers: one module per layer kind, all subclasses of `SVDLayer`."""
from .attention import SVDMultiheadAttention
from .base import SVDLayer, cached, require_finite, svd_layers
from .composite import SVDComposite
from .conv import SVD_CONVS, SVDConv, SVDConv1d, SVDConv2d, SVDConv3d, conv_spec, scheme_for
from .linear import SVDLinear
from .recurrent import SVDGRU, SVDLSTM, SVDRNN
from .transformers_conv1d import SVDConv1D, is_conv1d

__all__ = ["SVD_CONVS", "SVDComposite", "SVDConv", "SVDConv1D", "SVDConv1d", "SVDConv2d",
           "SVDConv3d", "SVDGRU", "SVDLSTM", "SVDLayer", "SVDLinear", "SVDMultiheadAttention",
           "SVDRNN", "cached", "conv_spec", "is_conv1d", "require_finite", "scheme_for", "svd_layers"]
