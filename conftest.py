"""Test set-up: without a GPU, Triton kernels run through its CPU interpreter.

The interpreter is chosen when a kernel is decorated, so this must run before
`svdkern.kernels` is imported; it leaves an explicit TRITON_INTERPRET alone. Where the
installed Triton and NumPy cannot run the interpreter, the session stops at once with the
reason and the fix, instead of failing every kernel test with an opaque error.

On a GPU the kernels run untuned (SVDKERN_AUTOTUNE=0, unless set): timing every config at
every new test shape would compile each kernel about ten times per specialization, minutes
of a short GPU lease; the CUDA-only autotune tests switch tuning back on."""
import os

import pytest
import torch

if torch.cuda.is_available():
    os.environ.setdefault("SVDKERN_AUTOTUNE", "0")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from svdkern import backend  # noqa: E402  (after TRITON_INTERPRET is set)


def pytest_configure(config):
    if backend.interpreter_enabled() and backend.triton_installed():
        why = backend.triton_blocker(torch.device("cpu"))
        if why is not None:
            raise pytest.UsageError(f"the Triton kernel tests cannot run here: {why}")
