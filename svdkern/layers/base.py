"""`SVDLayer`: the state every SVD layer shares, a weight held and trained as `U diag(s) V^T`.

The factors are parameters `U`, `s`, `V` (per group for convs); `weight` (the dense weight,
computed on read) and the dense layer's attributes stay readable, so third-party code that
inspects layers keeps working. No SVD is taken while training; one is taken only to build
a layer from a dense weight. Rank changes (pruning, loading a pruned checkpoint) keep the
Parameter objects, so optimizers and hooks stay attached.
"""
from __future__ import annotations

import contextlib
import numbers
import threading
from typing import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from .. import dispatch, reference


_READ_ONLY_WEIGHT = ("{}: weight is computed from the factors U, s, V and cannot be assigned; "
                     "write U, s, V (or call reset_parameters()), or keep this layer dense "
                     "(decompose(..., skip=[name]))")


class SVDLayer(nn.Module):
    """Common state of the SVD layers: factors `U`, `s`, `V`, an optional bias, a name.

    Subclasses define `_grouped` shapes: `grouped_factors()` always returns 3-D `U`
    (g, rows, r), 2-D `s` (g, r) and 3-D `V` (g, cols, r), whatever the stored layout.
    """

    layer_name: str

    def _check_rank(self, rank: int | None, rows: int, cols: int) -> int:
        """`rank` (None: full), or a ValueError naming the layer when it is out of range."""
        if rank is None:
            return min(rows, cols)
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise TypeError(f"{self.layer_name}: rank must be an integer, got "
                            f"{type(rank).__name__} {rank!r}")
        if not 1 <= rank <= min(rows, cols):
            raise ValueError(f"{self.layer_name}: rank {int(rank)} out of range "
                             f"[1, {min(rows, cols)}] for a {rows}x{cols} weight matrix")
        return int(rank)

    def _set_parameters(self, U: Tensor, s: Tensor, V: Tensor, bias: Tensor | None,
                        trainable: bool, bias_trainable: bool) -> None:
        # contiguous: V comes out of the SVD transposed; FSDP and kernels need dense storage
        self.U = nn.Parameter(self._from_grouped(U).contiguous(), trainable)
        self.s = nn.Parameter(self._from_grouped(s).contiguous(), trainable)
        self.V = nn.Parameter(self._from_grouped(V).contiguous(), trainable)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), bias_trainable)

    def _init_factors(self, matrix: Tensor, bias: Tensor | None, rank: int | None,
                      trainable: bool = True) -> None:
        """Factors from the per-group weight matrices `matrix` (g, rows, cols) by their SVD
        (exact at full rank); `trainable`: the dense weight's `requires_grad` (a frozen layer
        stays frozen)."""
        rank = self._check_rank(rank, *matrix.shape[-2:])
        require_finite(self.layer_name, "weight", matrix)
        U, s, V = reference.svd_factors(matrix, rank)
        self._set_parameters(U, s, V, bias, trainable,
                             bias is not None and bias.requires_grad)

    def _init_default(self, groups: int, rows: int, cols: int, fan_in: int, rank: int | None,
                      bias_size: int | None, device, dtype, variance: float | None = None,
                      bias_bound: float | None = None) -> None:
        """Factors distributed as the SVD of PyTorch's default init of the dense layer, with
        no SVD taken (`reference.default_init_factors`), and the dense layer's default bias
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of `bias_size` entries (None: no bias); a layer of
        another init gives its weights' `variance` and its bias bound (0: zeros)."""
        rank = self._check_rank(rank, rows, cols)
        U, s, V = reference.default_init_factors(groups, rows, cols, fan_in, rank, device, dtype,
                                                 variance)
        b = None
        if bias_size is not None:
            b = torch.empty(bias_size, device=device, dtype=U.dtype)
            bound = _default_bias_bound(fan_in) if bias_bound is None else bias_bound
            nn.init.uniform_(b, -bound, bound)
        self._set_parameters(U, s, V, b, True, True)

    def _reset_default(self, fan_in: int, variance: float | None = None,
                       bias_bound: float | None = None) -> None:
        """Overwrite the factors and bias in place (same storage, for `to_empty()` then
        `reset_parameters()`) with a fresh default init at the current rank."""
        g = self.num_groups
        (rows, cols), r = self.matrix_shape, self.rank
        factors = reference.default_init_factors(g, rows, cols, fan_in, r, self.U.device,
                                                 self.U.dtype, variance)
        with torch.no_grad():
            for param, value in zip((self.U, self.s, self.V), factors):
                param.copy_(self._from_grouped(value))
            if self.bias is not None:
                bound = _default_bias_bound(fan_in) if bias_bound is None else bias_bound
                nn.init.uniform_(self.bias, -bound, bound)

    @property
    def weight(self) -> Tensor:
        """The dense weight (shaped like the dense layer's, from the subclass's
        `_dense_weight`), differentiable, for code that inspects `weight`: recomputed on
        every read, or once per block of `svdkern.cached()`."""
        store = getattr(_weight_cache, "store", None)
        if store is None:
            return self._dense_weight()
        key = (self, torch.is_grad_enabled())  # one read under no_grad has no graph to reuse
        if key not in store:
            store[key] = self._dense_weight()
        return store[key]

    @weight.setter
    def weight(self, value) -> None:
        raise AttributeError(_READ_ONLY_WEIGHT.format(self.layer_name))

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        if name == "weight":  # `layer.weight = nn.Parameter(...)` lands here, not in the setter
            raise AttributeError(_READ_ONLY_WEIGHT.format(self.layer_name))
        super().register_parameter(name, param)

    # Layout adapters: SVDLinear stores 2-D factors, the convs store them per group.
    def _from_grouped(self, t: Tensor) -> Tensor:
        return t

    def _to_grouped(self, t: Tensor) -> Tensor:
        return t

    @property
    def rank(self) -> int:
        """Current rank r (per group for grouped convs)."""
        return self.s.shape[-1]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(rows, cols) of the (per-group) weight matrix `U diag(s) V^T`."""
        return self.U.shape[-2], self.V.shape[-2]

    @property
    def num_groups(self) -> int:
        return self._to_grouped(self.s).shape[0]

    def grouped_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """Factors as (g, rows, r), (g, r), (g, cols, r) views."""
        return self._to_grouped(self.U), self._to_grouped(self.s), self._to_grouped(self.V)

    def factor_matrices(self) -> Iterator[Tensor]:
        """Every 2-D `U` and `V` of the layer (one pair per group), for the orthogonality term."""
        U, _, V = self.grouped_factors()
        for g in range(U.shape[0]):
            yield U[g]
            yield V[g]

    def singular_values(self) -> Iterator[Tensor]:
        """Every singular-value vector of the layer (one per group), for the sparsity term."""
        yield from self._to_grouped(self.s).unbind(0)

    def set_factors(self, U: Tensor, s: Tensor, V: Tensor) -> None:
        """Replace the factors (grouped layout) in place, keeping the Parameter objects so
        optimizers and hooks that hold them stay attached; gradients are dropped."""
        for param, value in ((self.U, U), (self.s, s), (self.V, V)):
            _replace_data(param, self._from_grouped(value.detach().to(param.dtype)).contiguous())
        self._reinsert_parameters()

    def _reinsert_parameters(self) -> None:
        """Re-insert the parameter entries (same objects, same order) after their shapes
        changed: torch.compile before torch 2.13 guards a module's parameters through its
        parameter dict, not their shapes, and would rerun a graph built for the old ranks
        (seen with torch 2.11: Inductor crashed). No public API invalidates those guards for
        one module (`torch.compiler.reset()` would drop every compiled graph of the process);
        refilling the dict with the same entries is the change that was seen to work."""
        params = dict(self._parameters)
        self._parameters.clear()
        self._parameters.update(params)

    def select_ranks(self, t: Tensor, index: Tensor) -> Tensor:
        """Keep, along the rank axis of `t` (shaped like `U`, `s` or `V`), the per-group
        ranks `index` (g, k). Used by pruning on the factors and on optimizer state alike."""
        tg = self._to_grouped(t)
        idx = index.to(tg.device).view(index.shape[0], *([1] * (tg.dim() - 2)), index.shape[1])
        return self._from_grouped(torch.gather(tg, -1, idx.expand(*tg.shape[:-1], idx.shape[-1])))

    def dense_params(self) -> int:
        rows, cols = self.matrix_shape
        return self.num_groups * rows * cols + _numel(self.bias)

    def svd_params(self) -> int:
        return self.U.numel() + self.s.numel() + self.V.numel() + _numel(self.bias)

    def lowrank_params(self) -> int:
        """Parameters of the exported two-layer form: `s` is folded into the second layer."""
        rows, cols = self.matrix_shape
        return self.num_groups * self.rank * (rows + cols) + _numel(self.bias)

    def worth_factorizing(self) -> bool:
        """docs/SPEC.md rule: keep factorized only while `r (m + n) < m n`."""
        return dispatch.factorization_pays(*self.matrix_shape, self.rank)

    def check_finite(self) -> None:
        """Raise a ValueError naming the layer if any factor holds NaN or Inf."""
        for pname in ("U", "s", "V"):
            require_finite(self.layer_name, pname, getattr(self, pname))

    def _check_input(self, x: Tensor, expected_dims: tuple[int, ...] | None, feature_dim: int,
                     features: int) -> None:
        """Clear errors for inputs the layer cannot take (`expected_dims` None: any >= 1)."""
        if isinstance(x, torch.fx.Proxy):
            raise TypeError(f"{self.layer_name}: torch.fx symbolic tracing cannot enter an SVD "
                            "layer (its dispatch reads the input's shape): trace SVD layers as "
                            "leaf modules (a Tracer whose is_leaf_module is True for "
                            "svdkern.SVDLayer; torchvision's feature extraction takes "
                            "tracer_kwargs={'leaf_modules': [SVDLinear, SVDConv2d, ...]})")
        if not torch.is_floating_point(x):
            raise TypeError(f"{self.layer_name}: expected a floating-point input, got {x.dtype}")
        if x.device != self.U.device:
            raise ValueError(f"{self.layer_name}: input on {x.device} but weights on {self.U.device}")
        dims_ok = x.dim() >= 1 if expected_dims is None else x.dim() in expected_dims
        if not dims_ok or x.shape[feature_dim] != features:
            raise ValueError(f"{self.layer_name}: expected input with {features} features at dim "
                             f"{feature_dim}, got shape {tuple(x.shape)}")
        if x.dtype != self.U.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{self.layer_name}: input dtype {x.dtype} differs from weight dtype "
                            f"{self.U.dtype} (cast one, or run under torch.autocast)")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Adopt the checkpoint's rank, so a pruned model's state_dict loads into a model of
        the same architecture at any rank (no size mismatch)."""
        keys = [prefix + k for k in ("U", "s", "V")]
        if all(k in state_dict for k in keys):
            U, s, V = (state_dict[k] for k in keys)
            if self._consistent_shapes(U, s, V):
                for pname, value in zip(("U", "s", "V"), (U, s, V)):
                    param = getattr(self, pname)
                    if param.shape != value.shape:
                        _replace_data(param, param.data.new_empty(value.shape))
                self._reinsert_parameters()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _consistent_shapes(self, U: Tensor, s: Tensor, V: Tensor) -> bool:
        """Whether (U, s, V) are this layer's factors at some rank r >= 1."""
        if U.dim() != self.U.dim() or s.dim() != self.s.dim() or V.dim() != self.V.dim():
            return False
        r = s.shape[-1]
        rows, cols = self.matrix_shape
        return (r >= 1 and U.shape[:-1] == self.U.shape[:-1] and V.shape[:-1] == self.V.shape[:-1]
                and s.shape[:-1] == self.s.shape[:-1] and U.shape[-1] == r == V.shape[-1]
                and r <= min(rows, cols))


def _default_bias_bound(fan_in: int) -> float:
    """PyTorch's default bias init for `nn.Linear` / `nn.Conv2d`: U(-b, b), b = 1/sqrt(fan_in)."""
    return 1 / fan_in ** 0.5 if fan_in > 0 else 0.0


_weight_cache = threading.local()  # .store: layer -> weight inside this thread's cached()


@contextlib.contextmanager
def cached() -> Iterator[None]:
    """Within the block, each SVD layer's `weight` is built once and then reused, as
    `torch.nn.utils.parametrize.cached()` does for parametrized weights: for code that
    reads `weight` repeatedly (the result is differentiable; factors changed inside the
    block are not seen until it ends). Blocks nest; the cache is per thread."""
    outer = getattr(_weight_cache, "store", None)
    if outer is None:
        _weight_cache.store = {}
    try:
        yield
    finally:
        if outer is None:
            _weight_cache.store = None


def svd_layers(model: nn.Module) -> list[tuple[str, SVDLayer]]:
    """All SVD layers of `model` with their qualified names, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SVDLayer)]


_TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")


def _replace_data(param: nn.Parameter, value: Tensor) -> None:
    """Give `param` new data of any shape while keeping the Python object (optimizers and
    hooks hold it). `torch.utils.swap_tensors` also renews autograd's cached gradient
    accumulator, which a plain `param.data = value` keeps at the old shape while an old graph
    is alive; it refuses when other C++ references to the tensor exist, and then the plain
    assignment is used. `swap_tensors` exchanges the Python attributes too and leaves the
    hooks registered on the old data, so the fresh tensor is given `param`'s attributes
    first and `param` its hooks back after."""
    fresh = nn.Parameter(value, requires_grad=param.requires_grad)
    hooks = {name: getattr(param, name) for name in _TENSOR_HOOKS}
    for name, attribute in vars(param).items():
        setattr(fresh, name, attribute)
    try:
        torch.utils.swap_tensors(param, fresh)
    except RuntimeError:
        # `param.data = ...` drops autograd's cached accumulator only on a change of dtype or
        # device, not of shape: pass through an empty tensor of another dtype so a graph
        # alive now (a forward not yet back-propagated) cannot hand the next backward an
        # accumulator of the old shape
        param.data = value.new_empty(0, dtype=torch.float32 if value.dtype == torch.float16
                                     else torch.float16)
        param.data = value
        param.grad = None
        return
    for name, registered in hooks.items():
        setattr(param, name, registered)  # re-registers them on the new data


def require_finite(name: str, what: str, t: Tensor) -> None:
    """A ValueError `name: what contains NaN or Inf` unless every entry of `t` is finite
    (meta tensors hold no values: nothing to check)."""
    if t.is_meta:
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: {what} contains NaN or Inf")


def _numel(t: Tensor | None) -> int:
    return 0 if t is None else t.numel()
