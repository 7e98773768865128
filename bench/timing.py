"""How every case is timed, and the two hardware ceilings the roofline uses.

GPU: `triton.testing.do_bench` (CUDA events, warm-up, L2 flushed between calls, median).
CPU: `time.perf_counter` around each call after a warm-up, median of the repeats.
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


def median_ms(fn: Callable[[], object], device: torch.device, min_time_s: float = 0.2,
              max_reps: int = 200) -> float:
    """Median wall time of one call of `fn`, in milliseconds."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def rotation_count(bytes_per_set: int, device: torch.device, cap: int = 32) -> int:
    """Input sets to cycle through so the working set is at least twice the GPU's L2 (no
    case is timed on cache-resident inputs); one set on CPU."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    return max(1, min(cap, math.ceil(2 * l2 / max(1, bytes_per_set))))


def rotating(sets: Sequence[T]) -> Callable[[], T]:
    """A zero-argument callable returning the next input set on each call."""
    it = itertools.cycle(sets)
    return lambda: next(it)


def measure_ceilings(device: torch.device, dtype: torch.dtype, min_time_s: float = 0.2) -> dict:
    """Copy bandwidth (a large device copy, bytes read + written) and the matrix rate (a
    large square matmul in the cases' dtype), measured now, in this process."""
    big = device.type == "cuda"
    copy_elems = (1 << 28) if big else (1 << 24)          # 1 GiB / 64 MiB of fp32
    n = 8192 if big else 1024
    src = torch.randn(copy_elems, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, min_time_s)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = median_ms(lambda: a @ b, device, min_time_s)
    return {
        "copy_bytes": 2 * src.numel() * src.element_size(),
        "copy_gbps": 2 * src.numel() * src.element_size() / (copy_ms * 1e6),
        "matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_tflops": 2 * n ** 3 / (mm_ms * 1e9),
    }
