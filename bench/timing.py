"""How every case is timed, and the two hardware ceilings the roofline uses.

GPU: `triton.testing.do_bench` (CUDA events, warm-up, L2 flushed between calls), at least
`MIN_SAMPLES` calls. CPU: `time.perf_counter` around each call after a warm-up. Both report
the median, 20th and 80th percentiles and the sample count.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import time
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


MIN_SAMPLES = 10


def time_ms(fn: Callable[[], object], device: torch.device, min_time_s: float = 0.2,
            max_reps: int = 200) -> dict:
    """Timing of one call of `fn`: median, 20th and 80th percentiles and sample count (ms).
    On a GPU at least `MIN_SAMPLES` timed calls even for long cases (do_bench sizes its
    repeats to `rep` ms, which left a 100 ms training step one sample); `host_ms` is the
    median time Python takes to issue one call (no sync inside): where it is near the GPU
    time, the case measures launch overhead, not kernels."""
    if device.type == "cuda":
        import triton.testing
        times = list(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all"))
        while len(times) < MIN_SAMPLES:  # do_bench re-estimates its repeat count each call
            times += triton.testing.do_bench(fn, warmup=0, rep=MIN_SAMPLES * max(times),
                                             return_mode="all")
        host = []
        for _ in range(5):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            host.append(1e3 * (time.perf_counter() - t0))
        torch.cuda.synchronize(device)
        return _summary([float(t) for t in times], host_ms=statistics.median(host))
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return _summary(times)


def _summary(times: list[float], **extra) -> dict:
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return {"time_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[-1],
            "samples": len(times), **extra}


def median_ms(fn: Callable[[], object], device: torch.device, min_time_s: float = 0.2) -> float:
    """Median time of one call of `fn`, in milliseconds."""
    return time_ms(fn, device, min_time_s)["time_ms"]


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
    """Copy bandwidth (a large device copy, bytes read + written), the matrix rate (a large
    square matmul in the cases' dtype) and the fp32 matrix rate with TF32 off (the rate of
    the fp32 IEEE work: the regularizer's factors), measured now, in this process. The
    first measurement is repeated: it also warms the clocks up."""
    big = device.type == "cuda"
    copy_elems = (1 << 28) if big else (1 << 24)          # 1 GiB / 64 MiB of fp32
    n = 8192 if big else 1024
    src = torch.randn(copy_elems, device=device)
    dst = torch.empty_like(src)
    median_ms(lambda: dst.copy_(src), device, min_time_s)
    copy_ms = median_ms(lambda: dst.copy_(src), device, min_time_s)
    rates = {}
    for key, dt, precision in (("matmul_tflops", dtype, contextlib.nullcontext),
                               ("fp32_ieee_tflops", torch.float32, _ieee_fp32)):
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        with precision():
            rates[key] = 2 * n ** 3 / (median_ms(lambda: a @ b, device, min_time_s) * 1e9)
    return {
        "copy_bytes": 2 * src.numel() * src.element_size(),
        "copy_gbps": 2 * src.numel() * src.element_size() / (copy_ms * 1e6),
        "matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""), **rates,
    }


@contextlib.contextmanager
def _ieee_fp32():
    """CUDA fp32 matmuls without TF32 for the block, through the API torch >= 2.9 has (the
    legacy switch raises once the new one was set; svdkern.backend reads the same)."""
    matmul = torch.backends.cuda.matmul
    attr = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    saved = getattr(matmul, attr)
    setattr(matmul, attr, "ieee" if attr == "fp32_precision" else False)
    try:
        yield
    finally:
        setattr(matmul, attr, saved)
