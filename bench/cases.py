"""Every benchmark case and its alternatives, as zero-argument callables.

A case is built for one preset and device; each alternative runs the same computation a
user could pick instead:
- layers: "dense" (`F.linear` of the same weight), "eager reference" (backend reference),
  "compiled reference" (`torch.compile` of `reference.svd_linear`), "svdkern" (backend
  auto: the dispatch of `svdkern.ops`);
- crossover: each path the dispatch may take ("chain", "materialized", "fused"), forced,
  over a sweep of batch sizes, to measure where each wins;
- regularizer (loss + backward over all SVD layers of a model): "eager loop", "compiled
  loop", "svdkern";
- training step (forward, backward, regularizer, Adam): "dense", "SVD reference", "svdkern";
- inference after truncating every layer to a fixed fraction of its rank: "dense" versus
  the "exported low-rank" model (`svdkern.export`).
The pytest suite and the report script both build their callables here, so they time the
same thing.
"""
from __future__ import annotations

import copy
import functools
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from svdkern import (SVDConv2d, SVDLinear, SVDRegularizer, backend, decompose, dispatch, export,
                     ops, reference, svd_layers)
from svdkern.compress.pruning import apply_plan
from svdkern.reference import ConvSpec

from . import cost
from .config import Preset
from .models import MODELS, batch, build, task_loss
from .timing import rotating, rotation_count

LAYER_ALTERNATIVES = ("dense", "eager reference", "compiled reference", "svdkern")
# "svdkern" runs the regularizer's default precision (TF32 on a GPU, IEEE elsewhere); the
# baselines are plain fp32 PyTorch (IEEE).
REGULARIZER_ALTERNATIVES = ("eager loop", "compiled loop", "svdkern ieee", "svdkern",
                            "svdkern bf16")
REGULARIZER_PRECISION = {"svdkern ieee": "ieee", "svdkern": None, "svdkern bf16": "bf16"}
STEP_ALTERNATIVES = ("dense", "SVD reference", "svdkern")
INFERENCE_ALTERNATIVES = ("dense", "exported low-rank")
INFERENCE_RANK_FRACTION = 0.25

# (model, layer, input channels or features, kernel taps, output features, output side at
# 224 px or None for token rows): the GEMM has n = channels * taps inputs. The linears come
# first; the ResNet rows are the GEMM view of its convs (the fused linear kernel on im2col
# shapes: SVDConv2d itself runs as convs, timed in the crossover group), last in each tier.
LAYER_SOURCES = (
    ("vit_b16", "attn.qkv", 768, 1, 2304, None),
    ("vit_b16", "mlp.fc1", 768, 1, 3072, None),
    ("vit_b16", "mlp.fc2", 3072, 1, 768, None),
    ("gpt2", "attn.c_attn", 768, 1, 2304, None),
    ("gpt2", "attn.c_proj", 768, 1, 768, None),
    ("gpt2", "mlp.c_fc", 768, 1, 3072, None),
    ("resnet50", "layer1.conv2 3x3", 64, 9, 64, 56),
    ("resnet50", "layer3.conv2 3x3", 256, 9, 256, 14),
    ("resnet50", "layer3.conv3 1x1", 256, 1, 1024, 14),
    ("resnet50", "layer4.conv2 3x3", 512, 9, 512, 7),
)


@dataclass(frozen=True)
class LayerShape:
    """One layer-case GEMM: `x (rows, n) -> (rows, m)` at rank `rank`."""

    model: str
    layer: str
    rows: int
    n: int
    m: int
    rank: int

    @property
    def id(self) -> str:
        layer = self.layer.replace(" ", "_")
        return f"{self.model}.{layer}-B{self.rows}-{self.n}x{self.m}-r{self.rank}"

    def flops(self, alternative: str) -> int:
        if alternative == "dense":
            return cost.linear_dense_flops(self.rows, self.n, self.m)
        if alternative in ("chain", "fused"):
            return cost.linear_chain_flops(self.rows, self.n, self.m, self.rank)
        if alternative == "materialized":
            return cost.linear_materialized_flops(self.rows, self.n, self.m, self.rank)
        return cost.svd_linear_work(self.rows, self.n, self.m, self.rank)

    def bytes(self, alternative: str, itemsize: int) -> int:
        params = self.m * self.n if alternative == "dense" else self.rank * (self.m + self.n + 1)
        return cost.linear_bytes(self.rows, self.n, self.m, params, itemsize)


def layer_shapes(p: Preset) -> list[LayerShape]:
    """Each source layer at full rank min(n, m), a quarter and a sixteenth of it, and an
    eighth of it with and without one more (energy pruning leaves ranks that are no multiple
    of anything: the factors' row strides then allow no 16-byte loads; the pair measures what
    that costs, and what `prune(..., rank_multiple=8)` saves); convs as GEMMs with
    B = N * H_out * W_out, channels scaled by the preset. Ordered by rank tier (full and a
    sixteenth, then a quarter, then the eighths), each tier over every model, so a run cut
    at its time limit has the key rows of all three stacks."""
    shapes = []
    for model, layer, channels, taps, m, side in LAYER_SOURCES:
        if side is None:
            rows = p.vit_batch * p.vit_tokens if model == "vit_b16" else p.gpt_batch * p.gpt_seq
        else:
            rows = p.layer_images * max(1, side * p.image_side // 224) ** 2
        n, m = p.width(channels) * taps, p.width(m)
        full = min(n, m)
        ranks = (full, max(1, full // 4), max(1, full // 16), max(1, full // 8), full // 8 + 1)
        seen: set[int] = set()
        for rank, tier in zip(ranks, (0, 1, 0, 2, 2)):
            if rank not in seen:
                seen.add(rank)
                shapes.append((tier, LayerShape(model, layer, rows, n, m, rank)))
    return [s for _, s in sorted(shapes, key=lambda ts: ts[0])]  # stable: model order kept


# Sources of the crossover sweep: GPT-2 projections as linear layers, ResNet-50 3x3 convs
# as convolutions (the conv dispatch picks between two thin convs and one dense conv).
LINEAR_CROSSOVER_SOURCES = (("gpt2", "mlp.c_fc"), ("gpt2", "attn.c_proj"))
CONV_CROSSOVER_SOURCES = (("resnet50", "layer1.conv2 3x3"), ("resnet50", "layer3.conv2 3x3"))


@dataclass(frozen=True)
class ConvShape:
    """One crossover conv: `images` x `channels` x `side`^2 -> `out` channels, 3x3, padding 1,
    at rank `rank`; `rows`, `n`, `m` are its GEMM view (B = N H W, n = 9 C)."""

    model: str
    layer: str
    images: int
    channels: int
    out: int
    side: int
    rank: int

    rows = property(lambda self: self.images * self.side ** 2)
    n = property(lambda self: 9 * self.channels)
    m = property(lambda self: self.out)

    @property
    def id(self) -> str:
        layer = self.layer.replace(" ", "_")
        return (f"{self.model}.{layer}-N{self.images}-{self.channels}x{self.out}"
                f"@{self.side}px-r{self.rank}")

    def flops(self, alternative: str) -> int:
        chain, materialized = dispatch.conv_flops(
            (self.images, self.channels, self.side, self.side), conv_spec(self), self.rank)
        return cost.FORWARD_AND_BACKWARD * (chain if alternative == "chain" else materialized)


def conv_spec(shape: ConvShape) -> ConvSpec:
    return ConvSpec(shape.channels, shape.out, (3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros",
                    "channel")


def crossover_shapes(p: Preset) -> list[LayerShape | ConvShape]:
    """Each crossover source at full rank, a quarter and a sixteenth of it, over batches of
    16, 64, 256, ... rows (linear) or 1, 4, 16, ... images (conv) up to the preset's
    `crossover_rows` GEMM rows."""
    shapes: list[LayerShape | ConvShape] = []
    for s in layer_shapes(p):
        if (s.model, s.layer) in LINEAR_CROSSOVER_SOURCES:
            shapes += [LayerShape(s.model, s.layer, 16 * 4 ** k, s.n, s.m, s.rank)
                       for k in range(12) if 16 * 4 ** k <= p.crossover_rows]
    for model, layer, channels, _, out, side in LAYER_SOURCES:
        if (model, layer) not in CONV_CROSSOVER_SOURCES:
            continue
        c, out, hw = p.width(channels), p.width(out), max(1, side * p.image_side // 224)
        full = min(9 * c, out)
        for rank in dict.fromkeys((full, max(1, full // 4), max(1, full // 16))):
            shapes += [ConvShape(model, layer, 4 ** k, c, out, hw, rank)
                       for k in range(12) if 4 ** k * hw * hw <= p.crossover_rows]
    return shapes


def conv_case(shape: ConvShape, path: str, p: Preset,
              device: torch.device) -> Callable[[], tuple[Tensor, Tensor]]:
    """Forward + backward (dx and every factor gradient) of one SVD conv on `path`."""
    torch.manual_seed(0)
    layer = SVDConv2d(shape.channels, shape.out, 3, padding=1, bias=False, rank=shape.rank)
    U, s, V = (t.detach().to(device, p.dtype).requires_grad_() for t in (layer.U, layer.s, layer.V))
    x_shape = (shape.images, shape.channels, shape.side, shape.side)
    y_shape = (shape.images, shape.out, shape.side, shape.side)
    itemsize = torch.empty((), dtype=p.dtype).element_size()
    sets = [(torch.randn(x_shape, device=device, dtype=p.dtype).requires_grad_(),
             torch.randn(y_shape, device=device, dtype=p.dtype))
            for _ in range(rotation_count(itemsize * shape.rows * (shape.channels + shape.out),
                                          device))]
    next_set, fn, spec = rotating(sets), ops.CONV_PATHS[path], conv_spec(shape)
    assert spec == layer.spec

    def run() -> tuple[Tensor, Tensor]:
        x, dy = next_set()
        y = fn(x, U, s, V, None, spec)
        return y, torch.autograd.grad(y, (x, U, s, V), dy)[0]
    return run


def crossover_case(shape: LayerShape | ConvShape, path: str, p: Preset,
                   device: torch.device) -> Callable[[], tuple[Tensor, Tensor]]:
    if isinstance(shape, ConvShape):
        return conv_case(shape, path, p, device)
    return layer_case(shape, path, p, device)


def crossover_paths(shape: LayerShape | ConvShape, p: Preset, device: torch.device) -> list[str]:
    """The paths the dispatch may take for this case on this device (convs have no fused
    kernel)."""
    if isinstance(shape, ConvShape):
        return list(ops.CONV_PATHS)
    return [path for path in ops.LINEAR_PATHS if path != "fused" or fused_can_run(shape, p, device)]


def fused_can_run(shape: LayerShape, p: Preset, device: torch.device) -> bool:
    """The fused path exists for this case: Triton on this device, rank and dtype in range."""
    return backend.triton_can_run(device) and dispatch.fits(shape.rank, p.dtype)


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable, p: Preset) -> Callable:
    """One `torch.compile` wrapper per function, shared by every case (graphs are cached
    per shape, or one dynamic graph serves them all)."""
    limits = torch._dynamo.config
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(limits, knob):
            setattr(limits, knob, max(getattr(limits, knob), 256))
    return torch.compile(fn, dynamic=p.compile_dynamic, backend=p.compile_backend)


def _orthonormal(rows: int, r: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    q = torch.linalg.qr(torch.randn(rows, r, device=device))[0]
    return q.to(dtype).requires_grad_()


def _layer_operands(shape: LayerShape, p: Preset, device: torch.device):
    """Orthonormal factors, `s` and a rotation of (x, dy) sets for one layer case, drawn
    from the case's id (every alternative draws the same data)."""
    B, n, m, r, dtype = shape.rows, shape.n, shape.m, shape.rank, p.dtype
    torch.manual_seed(zlib.crc32(shape.id.encode()))
    U, V = _orthonormal(m, r, device, dtype), _orthonormal(n, r, device, dtype)
    s = (torch.rand(r, device=device) + 0.5).to(dtype).requires_grad_()
    itemsize = torch.empty((), dtype=dtype).element_size()
    sets = [(torch.randn(B, n, device=device, dtype=dtype).requires_grad_(),
             torch.randn(B, m, device=device, dtype=dtype))
            for _ in range(rotation_count(itemsize * B * (n + m), device))]
    return U, s, V, rotating(sets)


def _timed_step(next_set, forward, params, backend_name: str) -> Callable[[], tuple[Tensor, Tensor]]:
    """Forward + backward (dx and every parameter gradient) of `forward`; returns (y, dx)."""
    def run() -> tuple[Tensor, Tensor]:
        x, dy = next_set()
        with backend.use(backend_name):
            y = forward(x)
            grads = torch.autograd.grad(y, (x, *params), dy)
        return y, grads[0]
    return run


def layer_case(shape: LayerShape, alternative: str, p: Preset,
               device: torch.device) -> Callable[[], tuple[Tensor, Tensor]]:
    """Forward + backward (dx and every parameter gradient) of one layer; returns (y, dx).
    The dense weight is the materialized `U diag(s) V^T`, so all alternatives agree."""
    U, s, V, next_set = _layer_operands(shape, p, device)
    backend_name = "reference"
    if alternative == "dense":
        W = reference.materialize(U, s, V).detach().requires_grad_()
        params, forward = (W,), lambda x: F.linear(x, W)
    elif alternative == "compiled reference":
        fn = compiled(reference.svd_linear, p)
        params, forward = (U, s, V), lambda x: fn(x, U, s, V)
    elif alternative in ("eager reference", "svdkern"):
        backend_name = "auto" if alternative == "svdkern" else "reference"
        params, forward = (U, s, V), lambda x: ops.svd_linear(x, U, s, V)
    elif alternative in ops.LINEAR_PATHS:
        path = ops.LINEAR_PATHS[alternative]
        params, forward = (U, s, V), lambda x: path(x, U, s, V)
    else:
        raise ValueError(f"unknown layer alternative {alternative!r}")
    return _timed_step(next_set, forward, params, backend_name)


# Tradeoffs docs/SPEC.md section 3 settles by a model, timed so a GPU run can check them:
# the chain's bias in its GEMM's epilogue against a separate add (and its own reduction for
# db), and ranks past the fused kernel's on-chip limit, which run the chain, against dense.
TRADEOFF_ALTERNATIVES = ("dense", "chain", "chain, bias apart")
TRADEOFF_SOURCE = ("vit_b16", "mlp.fc1")


def tradeoff_shapes(p: Preset) -> list[LayerShape]:
    """ViT-B's fc1 at its real width (768 -> 3072, whatever the preset: the ranks past the
    on-chip limit need it) at ranks 48 (fits on chip) and 129 to 512, at the preset's rows."""
    source = next(s for s in layer_shapes(p) if (s.model, s.layer) == TRADEOFF_SOURCE)
    _, _, n, _, m, _ = next(src for src in LAYER_SOURCES if src[:2] == TRADEOFF_SOURCE)
    return [LayerShape(source.model, source.layer, source.rows, n, m, r)
            for r in (48, 129, 192, 256, 384, 512)]


def _chain_bias_apart(x: Tensor, U: Tensor, s: Tensor, V: Tensor, b: Tensor) -> Tensor:
    """The chain as it was before the bias moved into the GEMM: a separate add over y."""
    return ((x @ V) * s) @ U.transpose(-1, -2) + b


def tradeoff_case(shape: LayerShape, alternative: str, p: Preset,
                  device: torch.device) -> Callable[[], tuple[Tensor, Tensor]]:
    """Forward + backward of one biased layer (dense, or the chain with the bias in the
    GEMM or apart); returns (y, dx)."""
    U, s, V, next_set = _layer_operands(shape, p, device)
    b = torch.randn(shape.m, device=device, dtype=p.dtype).requires_grad_()
    if alternative == "dense":
        W = reference.materialize(U, s, V).detach().requires_grad_()
        params, forward = (W, b), lambda x: F.linear(x, W, b)
    elif alternative == "chain":
        params, forward = (U, s, V, b), lambda x: reference.svd_linear(x, U, s, V, b)
    elif alternative == "chain, bias apart":
        params, forward = (U, s, V, b), lambda x: _chain_bias_apart(x, U, s, V, b)
    else:
        raise ValueError(f"unknown tradeoff alternative {alternative!r}")
    return _timed_step(next_set, forward, params, "reference")


# Building a layer from scratch: svdkern takes no SVD (QR factors, the default init's
# spectrum); the goal is at most 1.5x two nn.init.orthogonal_ of its factors.
INIT_ALTERNATIVES = ("nn.Linear", "two orthogonal_", "SVDLinear")
INIT_SIZES = (1024, 4096)


def init_case(size: int, alternative: str, device: torch.device) -> Callable[[], Tensor]:
    """A square layer of `size` built from scratch on `device`; returns a tensor of it."""
    def run() -> Tensor:
        if alternative == "nn.Linear":
            return nn.Linear(size, size, device=device).weight
        if alternative == "two orthogonal_":
            U = nn.init.orthogonal_(torch.empty(size, size, device=device))
            return nn.init.orthogonal_(torch.empty(size, size, device=device)) + U[0, 0]
        if alternative == "SVDLinear":
            return SVDLinear(size, size, device=device).s
        raise ValueError(f"unknown init alternative {alternative!r}")
    return run


# ----------------------------------------------------------------------------- whole models
@functools.lru_cache(maxsize=None)
def dense_model(name: str, p: Preset, device: torch.device) -> nn.Module:
    """The dense stack, same seed for every call, so SVD models start from it."""
    torch.manual_seed(0)
    return build(name, p).to(device)


@functools.lru_cache(maxsize=None)
def svd_model(name: str, p: Preset, device: torch.device) -> nn.Module:
    """The dense stack decomposed at full rank (SVDs taken once per process, in float64 on
    `device`: on CPU they took minutes for the transformer stacks)."""
    torch.manual_seed(0)
    return decompose(build(name, p).to(device))


def _params(model: nn.Module) -> list[Tensor]:
    return [t for _, layer in svd_layers(model) for t in (layer.U, layer.s, layer.V)]


def _regularizer_loop(mats: list[Tensor], svals: list[Tensor], ortho: float,
                      strength: float) -> Tensor:
    """SVDRegularizer's objective (Hoyer sparsity) on the reference maths, for compiling."""
    return ortho * reference.orthogonality_loss(mats) + strength * reference.hoyer_loss(svals)


def regularizer_work(name: str, p: Preset, device: torch.device) -> tuple[int, int, int]:
    """(matrices, FLOPs, bytes) of the orthogonality term over the model's U and V (the
    sparsity term is negligible beside it)."""
    mats = [M for _, layer in svd_layers(svd_model(name, p, device)) for M in layer.factor_matrices()]
    flops = sum(cost.orthogonality_flops(*M.shape) for M in mats)
    nbytes = sum(cost.orthogonality_bytes(*M.shape, M.element_size()) for M in mats)
    return len(mats), flops, nbytes


def regularizer_case(name: str, alternative: str, p: Preset,
                     device: torch.device) -> Callable[[], Tensor]:
    """Regularizer loss + gradients of every U, s, V of the model; returns the loss."""
    model = svd_model(name, p, device)
    reg = SVDRegularizer(model, precision=REGULARIZER_PRECISION.get(alternative, "ieee"))
    params = _params(model)
    if alternative == "compiled loop":
        fn = compiled(_regularizer_loop, p)

        def loss() -> Tensor:
            layers = [layer for _, layer in svd_layers(model)]
            return fn([M for layer in layers for M in layer.factor_matrices()],
                      [sv for layer in layers for sv in layer.singular_values()],
                      reg.ortho, reg.strength)
        backend_name = "reference"
    elif alternative == "eager loop" or alternative in REGULARIZER_PRECISION:
        loss, backend_name = reg, "reference" if alternative == "eager loop" else "auto"
    else:
        raise ValueError(f"unknown regularizer alternative {alternative!r}")

    def run() -> Tensor:
        with backend.use(backend_name):
            value = loss()
            torch.autograd.grad(value, params)
        return value.detach()
    return run


def _autocast(device: torch.device, p: Preset):
    return torch.autocast(device.type, dtype=p.dtype, enabled=p.dtype != torch.float32)


def step_case(name: str, alternative: str, p: Preset, device: torch.device) -> Callable[[], Tensor]:
    """One training step: forward (autocast on GPU), task loss, regularizer (SVD models,
    outside autocast so it stays fp32), backward, Adam step; returns the loss."""
    if alternative not in STEP_ALTERNATIVES:
        raise ValueError(f"unknown training-step alternative {alternative!r}")
    x, target = batch(name, p, device)
    dense = alternative == "dense"
    model = dense_model(name, p, device) if dense else svd_model(name, p, device)
    model.train()
    reg = None if dense else SVDRegularizer(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    backend_name = "reference" if alternative == "SVD reference" else "auto"

    def run() -> Tensor:
        with backend.use(backend_name):
            with _autocast(device, p):
                loss = task_loss(model(x), target)
            if reg is not None:
                loss = loss + reg()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return run


def truncate_ranks(model: nn.Module, fraction: float) -> nn.Module:
    """Keep, in every SVD layer, the largest `fraction` of its singular values (at least
    one): pruning to a fixed rank rather than by energy, so every model shrinks alike."""
    plans = []
    for name, layer in svd_layers(model):
        s = layer._to_grouped(layer.s).detach().abs()
        k = max(1, int(fraction * s.shape[-1]))
        plans.append((name, layer, torch.topk(s, k, dim=-1).indices.sort(dim=-1).values))
    apply_plan(plans)
    return model


def inference_case(name: str, alternative: str, p: Preset,
                   device: torch.device) -> Callable[[], Tensor]:
    """Eval-mode forward of the dense model or of the exported low-rank model."""
    x, _ = batch(name, p, device)
    if alternative == "dense":
        model = dense_model(name, p, device)
    elif alternative == "exported low-rank":
        pruned = truncate_ranks(copy.deepcopy(svd_model(name, p, device)), INFERENCE_RANK_FRACTION)
        model = export(pruned, "lowrank")
    else:
        raise ValueError(f"unknown inference alternative {alternative!r}")
    model = copy.deepcopy(model).eval()

    def run() -> Tensor:
        with torch.no_grad(), _autocast(device, p):
            return model(x)
    return run


__all__ = ["MODELS", "LAYER_ALTERNATIVES", "REGULARIZER_ALTERNATIVES", "STEP_ALTERNATIVES",
           "INFERENCE_ALTERNATIVES", "LayerShape", "ConvShape", "layer_shapes", "layer_case",
           "crossover_shapes", "crossover_case", "crossover_paths", "conv_spec",
           "fused_can_run", "regularizer_case", "regularizer_work", "step_case",
           "inference_case"]
