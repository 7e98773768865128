"""Triton kernels of svdkern (installed as `svdkern.kernels`)."""
