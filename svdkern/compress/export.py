"""`export`: turn an SVD model into plain `nn.Linear` / `nn.Conv2d` layers (no svdkern needed
to run it): two thin layers per SVD layer ("lowrank") or the merged dense layer ("dense")."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .. import reference
from ..layers import SVDConv2d, SVDLayer, SVDLinear, svd_layers
from .decompose import replace_modules

FORMS = ("lowrank", "dense")
# Modules of torch.nn that read a child linear's `.weight` and multiply by it themselves:
# attention's output projection always, the encoder layer's feed-forward in its inference
# fast path (nn.TransformerEncoder checks the same layers), the fused linear + cross-entropy
# loss (torch >= 2.13). A two-layer pair has no `.weight`, and they would use the dense
# product anyway, so those children are exported dense.
DENSE_UNDER = {nn.MultiheadAttention: ("out_proj",),
               nn.TransformerEncoderLayer: ("linear1", "linear2")}
if hasattr(nn, "LinearCrossEntropyLoss"):
    DENSE_UNDER[nn.LinearCrossEntropyLoss] = ("linear",)


@torch.no_grad()
def export(model: nn.Module, form: str = "lowrank") -> nn.Module:
    """A new model computing the same function as `model` with its SVD layers replaced.

    "lowrank": each layer becomes an `nn.Sequential` of two thin layers with `U diag(s)`
    folded into the second, except layers where that is not cheaper than dense
    (`r (m + n) >= m n`) and the linears that a parent of `torch.nn` multiplies by their
    `.weight` itself (`DENSE_UNDER`), which are merged. "dense": every layer merged back.
    The input model is not modified.
    """
    if form not in FORMS:
        raise ValueError(f"export: unknown form {form!r}; expected one of {FORMS}")
    for _, layer in svd_layers(model):
        layer.check_finite()
    out = copy.deepcopy(model)
    if isinstance(out, SVDLayer):
        return replace_modules(out, {"": plain_layers(out, form)})
    merged = {f"{name}.{child}" if name else child for name, module in out.named_modules()
              for kind, children in DENSE_UNDER.items() if isinstance(module, kind)
              for child in children}
    return replace_modules(out, {name: plain_layers(layer, "dense" if name in merged else form)
                                 for name, layer in svd_layers(out)})


def plain_layers(layer: SVDLayer, form: str) -> nn.Module:
    """The plain-PyTorch module(s) computing `layer`."""
    lowrank = form == "lowrank" and layer.worth_factorizing()
    if isinstance(layer, SVDLinear):
        return _linear_lowrank(layer) if lowrank else _linear_dense(layer)
    if isinstance(layer, SVDConv2d):
        return _conv_lowrank(layer) if lowrank else _conv_dense(layer)
    raise TypeError(f"{layer.layer_name}: cannot export {type(layer).__name__}")


def _new_like(module_cls, *args, weight, bias, trainable: bool, **kwargs) -> nn.Module:
    """A plain layer holding `weight` (frozen unless `trainable`, as the factors were) and
    `bias` (as frozen as it was)."""
    layer = module_cls(*args, bias=bias is not None, device=weight.device, dtype=weight.dtype,
                       **kwargs)
    layer.weight.copy_(weight)
    layer.weight.requires_grad_(trainable)
    if bias is not None:
        layer.bias.copy_(bias)
        layer.bias.requires_grad_(bias.requires_grad)
    return layer


def _linear_dense(layer: SVDLinear) -> nn.Linear:
    return _new_like(nn.Linear, layer.in_features, layer.out_features,
                     weight=layer.weight, bias=layer.bias, trainable=layer.U.requires_grad)


def _linear_lowrank(layer: SVDLinear) -> nn.Sequential:
    trainable = layer.U.requires_grad
    first = _new_like(nn.Linear, layer.in_features, layer.rank, weight=layer.V.t(), bias=None,
                      trainable=trainable)
    second = _new_like(nn.Linear, layer.rank, layer.out_features,
                       weight=layer.U * layer.s, bias=layer.bias, trainable=trainable)
    return nn.Sequential(first, second)


def _conv_dense(layer: SVDConv2d) -> nn.Conv2d:
    sp = layer.spec
    return _new_like(nn.Conv2d, sp.in_channels, sp.out_channels, sp.kernel_size,
                     stride=sp.stride, padding=sp.padding, dilation=sp.dilation,
                     groups=sp.groups, padding_mode=sp.padding_mode,
                     weight=layer.weight, bias=layer.bias, trainable=layer.U.requires_grad)


def _conv_lowrank(layer: SVDConv2d) -> nn.Sequential:
    sp = layer.spec
    w1, w2 = reference.conv_chain_weights(layer.U, layer.s, layer.V, sp)
    geo1, geo2 = reference.conv_chain_geometry(sp)
    hidden, trainable = w1.shape[0], layer.U.requires_grad
    first = _new_like(nn.Conv2d, sp.in_channels, hidden, tuple(w1.shape[2:]), groups=sp.groups,
                      padding_mode=sp.padding_mode, weight=w1, bias=None, trainable=trainable,
                      **geo1)
    second = _new_like(nn.Conv2d, hidden, sp.out_channels, tuple(w2.shape[2:]), groups=sp.groups,
                       padding_mode=sp.padding_mode, weight=w2, bias=layer.bias,
                       trainable=trainable, **geo2)
    return nn.Sequential(first, second)
