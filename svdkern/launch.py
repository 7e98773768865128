"""What every Triton launcher of `svdkern.kernels` shares: compile options, the tuning
choice, the accumulator dtype, operand checks and host tables reused across steps.

It lives in `svdkern`, not in `kernels/`: that folder is a namespace portion with no
`__init__.py` (so a checkout's `kernels/` never passes for PyPI's `kernels` package), and
nothing here needs Triton, so `import svdkern` never requires it.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence, TypeVar

import torch
from torch import Tensor

from .backend import autotune_enabled

T = TypeVar("T")

# Compile options of every launch. Contracting `a * b + c` into FMAs is Triton's default
# today, but the default is changing (Triton 3.9 warns at each first compile, 3.10 turns it
# off): stating it keeps the kernels' rounding the same across Triton versions.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def tuning_choices(configs: list) -> list:
    """The configs the autotuner may time for a call: all of them, or the first alone when
    `svdkern.backend.autotune_enabled()` is off (nothing left to choose by timing)."""
    return configs if autotune_enabled() else configs[:1]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels accumulate in fp32, or fp64 for fp64 operands (matching the reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def common_operands(name: str, tensors: Sequence[Tensor]) -> tuple[torch.device, torch.dtype]:
    """Device and the dtype the kernels read (the promoted input dtype; bf16 is read as
    fp32 on CPU, where the interpreter has no bf16), with a clear error for unusable ones."""
    if len(tensors) == 0:
        raise ValueError(f"{name}: got no tensors")
    device = tensors[0].device
    dtype = tensors[0].dtype
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"{name}: tensor {i} is on {t.device}, tensor 0 on {device}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: tensor {i} has dtype {t.dtype}, expected floating point")
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype == torch.bfloat16 and device.type == "cpu":
        dtype = torch.float32
    return device, dtype


def reused_across_steps(build: Callable[..., T]) -> Callable[..., T]:
    """`build(key, device)` memoized for eager calls, so a training step reuses its host
    tables and a change of ranks (pruning) builds new ones.

    A cached table must be an ordinary tensor: it is built outside inference mode (an
    inference tensor cannot be saved for a later backward), and the cache is bypassed while
    tracing or under a fake-tensor mode (non-strict `torch.export`, `make_fx`, memory
    estimates), which would otherwise cache a FakeTensor for eager calls, or hand them a
    real one."""
    cached = functools.lru_cache(maxsize=32)(build)

    @functools.wraps(build)
    def get(*args):
        if torch.compiler.is_compiling() or type(torch.empty(0)) is not torch.Tensor:
            return build(*args)  # traced, or a mode that makes other tensors (fake)
        with torch.inference_mode(False):
            return cached(*args)
    get.cache_clear, get.cache_info = cached.cache_clear, cached.cache_info
    return get
