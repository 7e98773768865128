"""Which implementation runs an op: the PyTorch reference or the Triton kernels.

`SVDKERN_BACKEND=reference|triton|auto` (default auto) sets it for the process (read once,
at import); `use()` overrides it in a block of the calling thread only (a thread-local
stack, which torch.compile traces and guards on, unlike a ContextVar), so threads never see
each other's override. `auto` takes Triton on CUDA tensors when Triton is installed and the
reference elsewhere, silently. `triton` on CPU tensors runs the kernels through Triton's
interpreter (`TRITON_INTERPRET=1`), which is how the tests exercise them without a GPU;
asking for it where it cannot run is an error.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import threading
from typing import Iterator

import torch

BACKENDS = ("reference", "triton", "auto")
_ENV_BACKEND = os.environ.get("SVDKERN_BACKEND", "auto").lower()
_overrides = threading.local()  # .stack: this thread's `use()` names, innermost last


def requested() -> str:
    """The backend asked for: the innermost `use()` block, else SVDKERN_BACKEND, else auto."""
    stack = getattr(_overrides, "stack", None)
    name = stack[-1] if stack else _ENV_BACKEND
    if name not in BACKENDS:
        raise ValueError(f"SVDKERN_BACKEND={name!r}: expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Run the block with backend `name` ("reference", "triton" or "auto")."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {BACKENDS}")
    if not hasattr(_overrides, "stack"):
        _overrides.stack = []
    _overrides.stack.append(name)
    try:
        yield
    finally:
        _overrides.stack.pop()


# Looked up once at import: plain constants (not an lru_cache) so torch.compile traces
# `resolve()` without a warning.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _release(package: str) -> tuple[int, int] | None:
    """(major, minor) of an installed package, or None when it is not installed."""
    try:
        found = re.match(r"(\d+)\.(\d+)", importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None
    return (int(found[1]), int(found[2])) if found else None


def _interpreter_defect() -> str | None:
    """Why Triton's interpreter cannot run our kernels with the installed packages, or None.

    Triton < 3.7 turns loop bounds into 1-element arrays and calls `int()` on them, which
    NumPy >= 2.4 refuses (triton-lang/triton#9171): every kernel with a runtime loop bound
    fails with an opaque InterpreterError. torch 2.11 pins Triton 3.6, so this pair is common.
    """
    triton, numpy = _release("triton"), _release("numpy")
    if triton is not None and numpy is not None and triton < (3, 7) and numpy >= (2, 4):
        return (f"Triton {'.'.join(map(str, triton))}'s interpreter cannot run with NumPy "
                f"{'.'.join(map(str, numpy))} (triton-lang/triton#9171, fixed in Triton 3.7): "
                "install 'numpy<2.4' or triton>=3.7")
    return None


_INTERPRETER_DEFECT = _interpreter_defect()


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """Whether the GPU kernels pick their block shapes by timing (the default). Off with
    SVDKERN_AUTOTUNE=0 or under `torch.use_deterministic_algorithms(True)`: each kernel then
    runs the first config of its list that suits the call, so runs repeat bitwise (a choice by
    timing can differ between runs, and with it the summation order) and no time goes to
    tuning. Read when a kernel first meets a shape."""
    if os.environ.get("SVDKERN_AUTOTUNE", "1") == "0":
        return False
    return not torch.are_deterministic_algorithms_enabled()


def tf32_allowed() -> bool:
    """Whether PyTorch lets fp32 matmuls round their inputs to TF32 (as `nn.Linear` then
    does). Read through `torch.backends.cuda.matmul.fp32_precision`, which also reflects the
    legacy `allow_tf32` and `set_float32_matmul_precision`; the legacy getters raise once a
    user has set the new API, so they are only the fallback for torch < 2.9."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is None:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    return precision == "tf32"


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """`tl.dot` input precision of the layer kernels: TF32 for fp32 on a GPU exactly where
    `tf32_allowed()` (as `nn.Linear` then runs), IEEE otherwise and always under the
    interpreter (which has no TF32). The regularizer has its own setting
    (`SVDRegularizer(precision=...)`, `reference.orthogonality_precision`)."""
    tf32 = (device.type == "cuda" and dtype == torch.float32 and not interpreter_enabled()
            and tf32_allowed())
    return "tf32" if tf32 else "ieee"


def triton_blocker(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on tensors of `device` in this process, or None."""
    if not triton_installed():
        return "Triton is not installed"
    if device.type == "cuda":
        return None
    if device.type != "cpu" or not interpreter_enabled():
        return (f"tensors are on {device.type} (use CUDA, or set TRITON_INTERPRET=1 before "
                "importing svdkern to run the kernels on CPU)")
    return _INTERPRETER_DEFECT


def triton_can_run(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of `device` in this process."""
    return triton_blocker(device) is None


def func_transform_active() -> bool:
    """Whether a `torch.func` transform (vmap, grad, jacrev, functional per-sample gradients)
    wraps the current call, eager or compiled (dynamo traces the query): the reference runs
    there. The custom ops cannot serve it: the autograd that `register_autograd` generates
    refuses every torch.func transform ("it must override the setup_context staticmethod"),
    so `torch.library.register_vmap` alone would still fail under grad and jacrev, and
    forward mode (jvp, jacfwd) has no custom-op rule at all. torch has no public predicate
    for an active transform (2.13), hence this one private query, kept in this one place."""
    return torch._C._are_functorch_transforms_active()


def resolve(device: torch.device) -> str:
    """"reference" or "triton" for an op on `device`, per the requested backend; always
    "reference" under a `torch.func` transform."""
    name = requested()
    if name == "reference" or func_transform_active():
        return "reference"
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_installed() else "reference"
    why = triton_blocker(device)
    if why is not None:
        raise RuntimeError(f"SVDKERN_BACKEND=triton cannot run: {why}")
    return "triton"
