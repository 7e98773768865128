"""`SVDConv2d`: `nn.Conv2d` held as per-group factors, run as two thin convs."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor
from torch.nn.modules.utils import _pair

from .. import dispatch, ops, reference
from ..reference import SCHEMES, ConvSpec
from .base import SVDLayer


class SVDConv2d(SVDLayer):
    """Conv2d held as per-group factors `U` (g, rows, r), `s` (g, r), `V` (g, cols, r).

    `scheme="channel"`: each group's weight is the (n/g) x (c/g*kh*kw) matrix and the layer
    runs as a kh x kw conv of g*r filters then a 1x1 conv. `scheme="spatial"`: the
    (n/g*kw) x (c/g*kh) matrix, run as a kh x 1 conv then a 1 x kw conv. Grouped and
    depthwise convs keep one matrix per group, all at the same rank. Built from scratch, the
    factors are distributed as the SVD of `nn.Conv2d`'s default initialization (as for
    `SVDLinear`), with no SVD taken.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 scheme: str = "channel", rank: int | None = None, device=None, dtype=None, *,
                 name: str = "SVDConv2d", _dense: nn.Conv2d | None = None) -> None:
        super().__init__()
        self.layer_name = name
        if scheme not in SCHEMES:
            raise ValueError(f"{name}: unknown scheme {scheme!r}; expected one of {SCHEMES}")
        # from scratch, nn.Conv2d on the meta device checks the arguments and allocates nothing
        dense = _dense if _dense is not None else nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device="meta")
        self.spec = conv_spec(dense, scheme, name)
        if _dense is not None:
            matrix = reference.conv_weight_to_matrix(dense.weight.detach(), self.spec)
            self._init_factors(matrix, dense.bias, rank, dense.weight.requires_grad)
        else:
            self._init_default(dense.groups, *self.spec.matrix_shape, self._fan_in(), rank,
                               out_channels if bias else None, device, dtype)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, scheme: str = "channel", rank: int | None = None,
                   name: str = "SVDConv2d") -> "SVDConv2d":
        """Exact SVD form of a trained `nn.Conv2d` (truncated if `rank` is given)."""
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"{name}: expected nn.Conv2d, got {type(layer).__name__}")
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, scheme=scheme,
                   rank=rank, name=name, _dense=layer)

    # nn.Conv2d's attributes, read from the spec so there is one source of truth.
    in_channels = property(lambda self: self.spec.in_channels)
    out_channels = property(lambda self: self.spec.out_channels)
    kernel_size = property(lambda self: self.spec.kernel_size)
    stride = property(lambda self: self.spec.stride)
    padding = property(lambda self: self.spec.padding)
    dilation = property(lambda self: self.spec.dilation)
    groups = property(lambda self: self.spec.groups)
    padding_mode = property(lambda self: self.spec.padding_mode)
    scheme = property(lambda self: self.spec.scheme)

    def reset_parameters(self) -> None:
        """Factors of a freshly initialized `nn.Conv2d` at the current rank, as built from
        scratch (meta-device construction, then `to_empty()` and this)."""
        self._reset_default(self._fan_in())

    def _fan_in(self) -> int:
        """Inputs of one output (nn.Conv2d's init scales by it): c/g * kh * kw."""
        sp = self.spec
        return sp.in_channels // sp.groups * sp.kernel_size[0] * sp.kernel_size[1]

    def _dense_weight(self) -> Tensor:
        return reference.conv_weight(self.U, self.s, self.V, self.spec)  # (out, in/g, kh, kw)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, (3, 4), -3, self.in_channels)
        return ops.svd_conv2d(x, self.U, self.s, self.V, self.bias, self.spec)

    def flops(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """(factorized, dense) FLOPs per image of input spatial size `in_hw`."""
        return dispatch.conv_chain_and_dense_flops((1, self.in_channels, *in_hw), self.spec,
                                               self.rank)

    def extra_repr(self) -> str:
        sp = self.spec
        return (f"{sp.in_channels}, {sp.out_channels}, kernel_size={sp.kernel_size}, "
                f"stride={sp.stride}, padding={sp.padding}, dilation={sp.dilation}, "
                f"groups={sp.groups}, scheme={sp.scheme}, rank={self.rank}, "
                f"bias={self.bias is not None}")


def conv_spec(dense: nn.Conv2d, scheme: str, name: str = "SVDConv2d") -> ConvSpec:
    """The geometry of `dense` held in SVD form under `scheme` (padding made explicit)."""
    kernel, dil, stride = _pair(dense.kernel_size), _pair(dense.dilation), _pair(dense.stride)
    return ConvSpec(dense.in_channels, dense.out_channels, kernel, stride,
                    explicit_padding(name, dense.padding, kernel, dil, stride), dil,
                    dense.groups, dense.padding_mode, scheme)


def explicit_padding(name: str, padding, kernel, dilation, stride) -> tuple[int, int]:
    """nn.Conv2d's padding as explicit (ph, pw); 'same' only where it is symmetric."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in total) or stride != (1, 1):
            raise ValueError(f"{name}: padding='same' with an even receptive field is asymmetric "
                             "and cannot be split into two convs; use explicit padding")
        return (total[0] // 2, total[1] // 2)
    return _pair(padding)
