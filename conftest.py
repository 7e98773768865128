"""Test set-up: without a GPU, Triton kernels run through its CPU interpreter.

The interpreter is chosen when a kernel is decorated, so this must run before
`svdkern.kernels` is imported; it leaves an explicit TRITON_INTERPRET alone."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
