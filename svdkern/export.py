"""`export`: turn an SVD model into plain `nn.Linear` / `nn.Conv2d` layers: two thin layers per
SVD layer ("lowrank") or the merged dense layer ("dense").

A low-rank pair sits in a `LowRankLinear` / `LowRankConv2d`, an `nn.Sequential` that also
answers what code reading a dense layer asks: `weight` (the dense product, recomputed on
read; not assignable), `bias`, and the layer's sizes and geometry: `nn.MultiheadAttention`
reads `out_proj.weight`, `nn.TransformerEncoderLayer` its linears' weights.
Its state_dict (`0.weight`, `1.weight`, `1.bias`) is a plain two-layer nn.Sequential's; a
whole pickled model needs svdkern importable to find these two classes."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import reference
from .convert import set_submodule
from .layers import SVDConv2d, SVDLayer, SVDLinear, svd_layers

FORMS = ("lowrank", "dense")


@torch.no_grad()
def export(model: nn.Module, form: str = "lowrank") -> nn.Module:
    """A new model computing the same function as `model` with its SVD layers replaced.

    "lowrank": each layer becomes a `LowRankLinear` / `LowRankConv2d` of two thin layers
    with `U diag(s)` folded into the second, except layers where that is not cheaper than dense
    (`r (m + n) >= m n`), which are merged. "dense": every layer merged back.
    The input model is not modified.
    """
    if form not in FORMS:
        raise ValueError(f"export: unknown form {form!r}; expected one of {FORMS}")
    for _, layer in svd_layers(model):
        layer.check_finite()
    out = copy.deepcopy(model)
    if isinstance(out, SVDLayer):
        return plain_layers(out, form)
    for name, layer in svd_layers(out):
        set_submodule(out, name, plain_layers(layer, form))
    return out


def plain_layers(layer: SVDLayer, form: str) -> nn.Module:
    """The plain-PyTorch module(s) computing `layer`."""
    lowrank = form == "lowrank" and layer.worth_factorizing()
    if isinstance(layer, SVDLinear):
        return _linear_lowrank(layer) if lowrank else _linear_dense(layer)
    if isinstance(layer, SVDConv2d):
        return _conv_lowrank(layer) if lowrank else _conv_dense(layer)
    raise TypeError(f"{layer.layer_name}: cannot export {type(layer).__name__}")


def _new_like(module_cls, *args, weight, bias, **kwargs) -> nn.Module:
    layer = module_cls(*args, bias=bias is not None, device=weight.device, dtype=weight.dtype,
                       **kwargs)
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def _linear_dense(layer: SVDLinear) -> nn.Linear:
    return _new_like(nn.Linear, layer.in_features, layer.out_features,
                     weight=layer.weight, bias=layer.bias)


class LowRankLinear(nn.Sequential):
    """`nn.Linear(in, r)` then `nn.Linear(r, out)`, seen from outside as one `nn.Linear`."""

    def __init__(self, first: nn.Linear, second: nn.Linear) -> None:
        super().__init__(first, second)
        self.in_features, self.out_features = first.in_features, second.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self[1].weight @ self[0].weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self[1].bias


class LowRankConv2d(nn.Sequential):
    """The two thin convs of a factorized conv, seen from outside as one `nn.Conv2d`."""

    def __init__(self, first: nn.Conv2d, second: nn.Conv2d, spec: reference.ConvSpec) -> None:
        super().__init__(first, second)
        for field in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                      "dilation", "groups", "padding_mode"):
            setattr(self, field, getattr(spec, field))

    @property
    def weight(self) -> torch.Tensor:
        return reference.conv_chain_to_weight(self[0].weight, self[1].weight, self.groups)

    @property
    def bias(self) -> torch.Tensor | None:
        return self[1].bias


def _linear_lowrank(layer: SVDLinear) -> LowRankLinear:
    first = _new_like(nn.Linear, layer.in_features, layer.rank, weight=layer.V.t(), bias=None)
    second = _new_like(nn.Linear, layer.rank, layer.out_features,
                       weight=layer.U * layer.s, bias=layer.bias)
    return LowRankLinear(first, second)


def _conv_dense(layer: SVDConv2d) -> nn.Conv2d:
    sp = layer.spec
    return _new_like(nn.Conv2d, sp.in_channels, sp.out_channels, sp.kernel_size,
                     stride=sp.stride, padding=sp.padding, dilation=sp.dilation,
                     groups=sp.groups, padding_mode=sp.padding_mode,
                     weight=layer.weight, bias=layer.bias)


def _conv_lowrank(layer: SVDConv2d) -> LowRankConv2d:
    sp = layer.spec
    w1, w2 = reference.conv_chain_weights(layer.U, layer.s, layer.V, sp)
    geo1, geo2 = reference.conv_chain_geometry(sp)
    hidden = w1.shape[0]
    first = _new_like(nn.Conv2d, sp.in_channels, hidden, tuple(w1.shape[2:]), groups=sp.groups,
                      padding_mode=sp.padding_mode, weight=w1, bias=None, **geo1)
    second = _new_like(nn.Conv2d, hidden, sp.out_channels, tuple(w2.shape[2:]), groups=sp.groups,
                       padding_mode=sp.padding_mode, weight=w2, bias=layer.bias, **geo2)
    return LowRankConv2d(first, second, sp)
