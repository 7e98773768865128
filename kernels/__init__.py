"""Triton kernels of svdkern (installed as `svdkern.kernels`)."""

# Compile options of every launch. Contracting `a * b + c` into FMAs is Triton's default
# today, but the default is changing (Triton 3.9 warns at each first compile, 3.10 turns it
# off): stating it keeps the kernels' rounding the same across Triton versions.
COMPILE_OPTIONS = {"enable_fp_fusion": True}
