"""Triton kernels of svdkern (installed as `svdkern.kernels`)."""
from svdkern.backend import autotune_enabled

# Compile options of every launch. Contracting `a * b + c` into FMAs is Triton's default
# today, but the default is changing (Triton 3.9 warns at each first compile, 3.10 turns it
# off): stating it keeps the kernels' rounding the same across Triton versions.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def tuning_choices(configs: list) -> list:
    """The configs the autotuner may time for a call: all of them, or the first alone when
    `svdkern.backend.autotune_enabled()` is off (nothing left to choose by timing)."""
    return configs if autotune_enabled() else configs[:1]
