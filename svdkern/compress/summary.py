"""`summary`: per-layer and total rank, parameters and FLOPs of an SVD model versus the
dense original."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..layers import SVDConv, SVDLayer, svd_layers
from .decompose import left_dense


@dataclass(frozen=True)
class LayerSummary:
    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    full_rank: int
    params: int
    dense_params: int
    flops: int | None
    dense_flops: int | None


@dataclass(frozen=True)
class ModelSummary:
    """Rows per SVD layer plus totals; `str()` renders the table."""

    layers: list[LayerSummary]

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def dense_params(self) -> int:
        return sum(r.dense_params for r in self.layers)

    @property
    def flops(self) -> int | None:
        return _total([r.flops for r in self.layers])

    @property
    def dense_flops(self) -> int | None:
        return _total([r.dense_flops for r in self.layers])

    def to_dict(self) -> dict:
        return {"layers": [r.__dict__ for r in self.layers],
                "total": {"params": self.params, "dense_params": self.dense_params,
                          "flops": self.flops, "dense_flops": self.dense_flops}}

    def __str__(self) -> str:
        head = ("layer", "kind", "matrix", "rank", "params", "dense", "ratio", "FLOPs", "dense",
                "ratio")
        rows = [(r.name, r.kind, f"{r.shape[0]}x{r.shape[1]}", f"{r.rank}/{r.full_rank}",
                 _si(r.params), _si(r.dense_params), _ratio(r.params, r.dense_params),
                 _si(r.flops), _si(r.dense_flops), _ratio(r.flops, r.dense_flops))
                for r in self.layers]
        rows.append(("total", "", "", "", _si(self.params), _si(self.dense_params),
                     _ratio(self.params, self.dense_params), _si(self.flops),
                     _si(self.dense_flops), _ratio(self.flops, self.dense_flops)))
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in rows]
        return "\n".join(lines)


@torch.no_grad()
def summary(model: nn.Module, example_input: torch.Tensor | None = None,
            verbose: bool = True) -> ModelSummary:
    """Table of every SVD layer: matrix shape, rank, parameters and FLOPs per sample (one
    input row for a linear, one sample for a conv) against the dense layer it replaces; the
    matrices of attention and RNNs count per token (they deploy merged, `export`).

    Conv FLOPs depend on the input size: pass `example_input` (one forward pass is run to
    read each conv's input size); without it they are left blank.
    """
    layers = svd_layers(model)
    if not layers:
        raise ValueError("summary: the model has no SVD layers (call svdkern.decompose first)")
    in_hw = _conv_input_sizes(model, example_input) if example_input is not None else {}
    rows = []
    for name, layer in layers:
        flops = dense_flops = None
        if not isinstance(layer, SVDConv) or name in in_hw:
            flops, dense_flops = layer.flops(in_hw.get(name))
        rows.append(LayerSummary(name, _kind(layer), layer.matrix_shape, layer.rank,
                                 min(layer.matrix_shape), layer.svd_params(),
                                 layer.dense_params(), flops, dense_flops))
    result = ModelSummary(rows)
    if verbose:
        print(result)
    return result


def _conv_input_sizes(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[int, ...]]:
    sizes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[-mod.dims:])))
        for name, m in svd_layers(model) if isinstance(m, SVDConv)]
    was_training = model.training
    model.eval()  # the probe pass must not update BatchNorm statistics
    try:
        model(example_input[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sizes


def _kind(layer: SVDLayer) -> str:
    if isinstance(layer, SVDConv):
        return f"conv{layer.dims}d-{layer.scheme}" + (f"/g{layer.groups}" if layer.groups > 1 else "")
    return "linear"


def _total(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]


def _si(v: int | None) -> str:
    if v is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return str(v)


def _ratio(a: int | None, b: int | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


@dataclass(frozen=True)
class Coverage:
    """What of a model is in SVD form: the SVD layers, every other module holding a matrix
    with why it is dense, and the share of the model's matrix parameters (each tensor once,
    SVD layers at their dense size) in SVD layers."""

    converted: list[str]
    left_dense: list[tuple[str, str]]
    svd_fraction: float

    def __str__(self) -> str:
        lines = [f"{len(self.converted)} SVD layers hold {100 * self.svd_fraction:.1f}% of the "
                 f"model's matrix parameters"]
        lines += [f"  dense: {name or '<root>'}: {why}" for name, why in self.left_dense]
        return "\n".join(lines)


def coverage(model: nn.Module) -> Coverage:
    """The `Coverage` of `model`, before or after `svdkern.decompose`."""
    layers = svd_layers(model)
    left = left_dense(model, (), [layer for _, layer in layers])
    seen: set[int] = set()
    svd = sum(layer.num_groups * layer.matrix_shape[0] * layer.matrix_shape[1]
              for _, layer in layers)
    other = 0
    for _, module in model.named_modules():
        if isinstance(module, SVDLayer):
            continue
        for p in module.parameters(recurse=False):
            if isinstance(p, nn.parameter.UninitializedParameter):
                continue  # no size yet (a lazy layer)
            if p.dim() >= 2 and id(p) not in seen:
                seen.add(id(p))
                other += p.numel()
    total = svd + other
    return Coverage([name for name, _ in layers], left, svd / total if total else 0.0)
