"""`SVDConv1d`, `SVDConv2d`, `SVDConv3d`: `nn.Conv1d/2d/3d` held as per-group factors, run as
two thin convs. One class, `SVDConv`, holds the logic; the three differ only in their
number of spatial dims and the torch class they mirror."""
from __future__ import annotations

import math

import torch.nn as nn
from torch import Tensor
from torch.nn.modules.utils import _ntuple

from .. import dispatch, ops, reference
from ..reference import SCHEMES, ConvSpec
from .base import SVDLayer


class SVDConv(SVDLayer):
    """A conv held as per-group factors `U` (g, rows, r), `s` (g, r), `V` (g, cols, r).

    `scheme="channel"`: each group's weight is the (n/g) x (c/g * prod(kernel)) matrix and
    the layer runs as a conv of g*r filters with the full kernel, then a 1x1 conv.
    `scheme="spatial"` (2-D only: the kernel splits into kh x 1 and 1 x kw): the
    (n/g*kw) x (c/g*kh) matrix, run as a kh x 1 conv then a 1 x kw conv. Grouped and
    depthwise convs keep one matrix per group, all at the same rank. Built from scratch, the
    factors are distributed as the SVD of the dense conv's default initialization (as for
    `SVDLinear`), with no SVD taken.
    """

    dims: int
    dense_type: type[nn.Module]

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 scheme: str = "channel", rank: int | None = None, device=None, dtype=None, *,
                 name: str | None = None, _dense: nn.Module | None = None) -> None:
        super().__init__()
        name = type(self).__name__ if name is None else name
        self.layer_name = name
        # from scratch, the dense conv on the meta device checks the arguments and allocates
        # nothing
        dense = _dense if _dense is not None else self.dense_type(
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
    def from_dense(cls, layer: nn.Module, scheme: str = "channel", rank: int | None = None,
                   name: str | None = None) -> "SVDConv":
        """Exact SVD form of a trained dense conv (truncated if `rank` is given)."""
        name = cls.__name__ if name is None else name
        if not isinstance(layer, cls.dense_type):
            raise TypeError(f"{name}: expected nn.{cls.dense_type.__name__}, got "
                            f"{type(layer).__name__}")
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, scheme=scheme,
                   rank=rank, name=name, _dense=layer)

    # The dense conv's attributes, read from the spec so there is one source of truth.
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
        """Factors of a freshly initialized dense conv at the current rank, as built from
        scratch (meta-device construction, then `to_empty()` and this)."""
        self._reset_default(self._fan_in())

    def _fan_in(self) -> int:
        """Inputs of one output (the dense conv's init scales by it): c/g * prod(kernel)."""
        sp = self.spec
        return sp.in_channels // sp.groups * math.prod(sp.kernel_size)

    def _dense_weight(self) -> Tensor:
        return reference.conv_weight(self.U, self.s, self.V, self.spec)  # (out, in/g, *kernel)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, (self.dims + 1, self.dims + 2), -1 - self.dims, self.in_channels)
        return ops.svd_conv(x, self.U, self.s, self.V, self.bias, self.spec)

    def flops(self, in_size: tuple[int, ...]) -> tuple[int, int]:
        """(factorized, dense) FLOPs per sample of input spatial size `in_size`."""
        return dispatch.conv_chain_and_dense_flops((1, self.in_channels, *in_size), self.spec,
                                                   self.rank)

    def extra_repr(self) -> str:
        sp = self.spec
        return (f"{sp.in_channels}, {sp.out_channels}, kernel_size={sp.kernel_size}, "
                f"stride={sp.stride}, padding={sp.padding}, dilation={sp.dilation}, "
                f"groups={sp.groups}, scheme={sp.scheme}, rank={self.rank}, "
                f"bias={self.bias is not None}")


class SVDConv1d(SVDConv):
    """`nn.Conv1d` in SVD form (channel scheme)."""
    dims, dense_type = 1, nn.Conv1d


class SVDConv2d(SVDConv):
    """`nn.Conv2d` in SVD form (channel or spatial scheme)."""
    dims, dense_type = 2, nn.Conv2d


class SVDConv3d(SVDConv):
    """`nn.Conv3d` in SVD form (channel scheme)."""
    dims, dense_type = 3, nn.Conv3d


SVD_CONVS = {nn.Conv1d: SVDConv1d, nn.Conv2d: SVDConv2d, nn.Conv3d: SVDConv3d}


def scheme_for(dense: nn.Module, scheme: str) -> str:
    """The scheme a model-wide `scheme` gives this conv: "spatial" applies to 2-D convs, the
    others take "channel" (their kernel has no kh x kw split)."""
    return scheme if len(dense.kernel_size) == 2 else "channel"


def conv_spec(dense: nn.Module, scheme: str, name: str = "SVDConv") -> ConvSpec:
    """The geometry of the dense conv `dense` held in SVD form under `scheme` (padding made
    explicit); "spatial" needs a 2-D conv."""
    if scheme not in SCHEMES:
        raise ValueError(f"{name}: unknown scheme {scheme!r}; expected one of {SCHEMES}")
    d = len(dense.kernel_size)
    if scheme == "spatial" and d != 2:
        raise ValueError(f"{name}: scheme 'spatial' splits a 2-D kernel into kh x 1 and 1 x kw "
                         f"convs; a {d}-D conv takes scheme 'channel'")
    tup = _ntuple(d)
    kernel, dil, stride = tup(dense.kernel_size), tup(dense.dilation), tup(dense.stride)
    return ConvSpec(dense.in_channels, dense.out_channels, kernel, stride,
                    explicit_padding(name, dense.padding, kernel, dil, stride), dil,
                    dense.groups, dense.padding_mode, scheme)


def explicit_padding(name: str, padding, kernel, dilation, stride) -> tuple[int, ...]:
    """A dense conv's padding as explicit per-dim padding; 'same' only where it is
    symmetric."""
    d = len(kernel)
    if padding == "valid":
        return (0,) * d
    if padding == "same":
        total = [dd * (k - 1) for k, dd in zip(kernel, dilation)]
        if any(t % 2 for t in total) or any(st != 1 for st in stride):
            raise ValueError(f"{name}: padding='same' with an even receptive field is asymmetric "
                             "and cannot be split into two convs; use explicit padding")
        return tuple(t // 2 for t in total)
    return _ntuple(d)(padding)
