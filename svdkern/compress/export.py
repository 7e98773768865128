"""`export`: turn an SVD model into plain `nn.Linear` / `nn.Conv1d/2d/3d` layers (no svdkern
needed to run it): two thin layers per SVD layer ("lowrank") or the merged dense layer
("dense"); attention and recurrent modules in SVD form become their merged torch module."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .. import reference
from ..reference import ConvSpec
from ..layers import SVDComposite, SVDConv, SVDConv1D, SVDLayer, SVDLinear, svd_layers
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
    Attention and recurrent modules in SVD form (`SVDComposite`: torch's fused kernels take
    dense weights) become their torch module with merged weights in either form.
    The input model is not modified.
    """
    if form not in FORMS:
        raise ValueError(f"export: unknown form {form!r}; expected one of {FORMS}")
    for _, layer in svd_layers(model):
        layer.check_finite()
    out = copy.deepcopy(model)
    if isinstance(out, SVDLayer):
        return replace_modules(out, {"": plain_layers(out, form)})
    merged = merged_on_export(out)
    composites = {name: m.to_dense() for name, m in out.named_modules()
                  if isinstance(m, SVDComposite)}
    out = replace_modules(out, composites)
    return replace_modules(out, {name: plain_layers(layer, "dense" if name in merged else form)
                                 for name, layer in svd_layers(out)})


def merged_on_export(model: nn.Module) -> set[str]:
    """Names of the SVD layers of `model` that `export(model, "lowrank")` merges whatever
    their rank: the matrices of attention and recurrent modules, and the linears their
    parent multiplies by `.weight` itself (`DENSE_UNDER`). Their deployed cost is dense."""
    merged = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, SVDComposite):
            merged |= {f"{prefix}factors.{n}" for n, _ in svd_layers(module.factors)}
        for kind, children in DENSE_UNDER.items():
            if isinstance(module, kind):
                merged |= {prefix + child for child in children}
    return merged


def plain_layers(layer: SVDLayer, form: str) -> nn.Module:
    """The plain-PyTorch module(s) computing `layer`."""
    lowrank = form == "lowrank" and layer.worth_factorizing()
    if isinstance(layer, SVDLinear):
        return _linear_lowrank(layer) if lowrank else _linear_dense(layer)
    if isinstance(layer, SVDConv):
        return _conv_lowrank(layer) if lowrank else _conv_dense(layer)
    raise TypeError(f"{layer.layer_name}: cannot export {type(layer).__name__}")


def _trains(*factors: torch.Tensor) -> bool:
    """Whether a weight built from `factors` trains: when any factor folded into it did (an
    s-only or V-frozen run trains part of the layer)."""
    return any(f.requires_grad for f in factors)


def _fill(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
          trainable: bool) -> nn.Module:
    """`layer` holding `weight` (frozen unless `trainable`, per the factors folded into it)
    and `bias` (as frozen as it was)."""
    layer.weight.copy_(weight)
    layer.weight.requires_grad_(trainable)
    if bias is not None:
        layer.bias.copy_(bias)
        layer.bias.requires_grad_(bias.requires_grad)
    return layer


def linear_pair(in_features: int, out_features: int, rank: int, bias: bool,
                **factory) -> nn.Sequential:
    """The empty low-rank form of a linear layer: `V^T` (rank x in), then `U diag(s)` (out x
    rank) with the bias. `load_compressed` rebuilds exactly this."""
    return nn.Sequential(nn.Linear(in_features, rank, bias=False, **factory),
                         nn.Linear(rank, out_features, bias=bias, **factory))


def conv_pair(spec: ConvSpec, rank: int, bias: bool, **factory) -> nn.Sequential:
    """The empty low-rank form of a conv (`reference.conv_chain_weights` shapes and
    `conv_chain_geometry`): the full-kernel (channel) or kh x 1 (spatial) conv to g*r
    channels, then the 1 x 1 or 1 x kw conv with the bias."""
    geo1, geo2 = reference.conv_chain_geometry(spec)
    first, second = reference.conv_chain_kernels(spec)
    hidden = spec.groups * rank
    conv = DENSE_CONVS[spec.dims]
    common = dict(groups=spec.groups, padding_mode=spec.padding_mode, **factory)
    return nn.Sequential(conv(spec.in_channels, hidden, first, bias=False, **geo1, **common),
                         conv(hidden, spec.out_channels, second, bias=bias, **geo2, **common))


DENSE_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _factory(layer: SVDLayer) -> dict:
    return dict(device=layer.U.device, dtype=layer.U.dtype)


def _linear_dense(layer: SVDLinear) -> nn.Module:
    """The merged layer: an `nn.Linear`, or for an `SVDConv1D` the transformers `Conv1D` it
    was (the model that held one has transformers)."""
    trains = _trains(layer.U, layer.s, layer.V)
    if isinstance(layer, SVDConv1D):
        from transformers.pytorch_utils import Conv1D
        dense = Conv1D(layer.nf, layer.nx).to(**_factory(layer))
        return _fill(dense, layer.weight, layer.bias, trains)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      **_factory(layer))
    return _fill(dense, layer.weight, layer.bias, trains)


def _linear_lowrank(layer: SVDLinear) -> nn.Sequential:
    pair = linear_pair(layer.in_features, layer.out_features, layer.rank,
                       layer.bias is not None, **_factory(layer))
    _fill(pair[0], layer.V.t(), None, _trains(layer.V))
    _fill(pair[1], layer.U * layer.s, layer.bias, _trains(layer.U, layer.s))
    return pair


def _conv_dense(layer: SVDConv) -> nn.Module:
    sp = layer.spec
    dense = layer.dense_type(sp.in_channels, sp.out_channels, sp.kernel_size, stride=sp.stride,
                      padding=sp.padding, dilation=sp.dilation, groups=sp.groups,
                      bias=layer.bias is not None, padding_mode=sp.padding_mode,
                      **_factory(layer))
    return _fill(dense, layer.weight, layer.bias, _trains(layer.U, layer.s, layer.V))


def _conv_lowrank(layer: SVDConv) -> nn.Sequential:
    w1, w2 = reference.conv_chain_weights(layer.U, layer.s, layer.V, layer.spec)
    pair = conv_pair(layer.spec, layer.rank, layer.bias is not None, **_factory(layer))
    _fill(pair[0], w1, None, _trains(layer.V))
    _fill(pair[1], w2, layer.bias, _trains(layer.U, layer.s))
    return pair
