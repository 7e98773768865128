"""Registers, spill stack and shared memory of every autotune config of the layer and
orthogonality kernels, compiled for sm_90 by Triton's own ptxas and read back with its
cuobjdump: no GPU needed.

Why: the interpreter runs no compiler, so register pressure, which decides whether a block
shape is worth tuning at all, is invisible to the tests. This table is how
`_REGISTER_BUDGET` in kernels/svd_linear.py and the orthogonality config lists were set;
re-run it after changing a kernel:

    python -m bench.kernel_resources [--dtypes bf16 fp32] [--out bench/results/FILE.md]

Each kernel is compiled exactly as a launch would compile it: the real launcher runs on CPU
tensors of a representative call with the kernel swapped for a recorder, and Triton's own
binder specializes the recorded arguments (16-byte aligned pointers, unit strides as
constants, sizes divisible by 16). Compiling with every integer left unspecialized instead
gives a different program: runtime unit strides make every address a 64-bit multiply-add,
and the register counts roughly double. The layer kernels are compiled for a rank equal to
`R_PAD` (factor strides divisible by 16), `R_PAD - 8` (divisible by 8, which the kernels
are told) and `R_PAD - 1` (neither).

It measures the compiler's output, not speed: the autotuner on a GPU still picks among
the configs kept.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from svdkern.backend import interpreter_enabled
from svdkern.kernels import orthogonality as O
from svdkern.kernels import sparsity as S
from svdkern.kernels import svd_linear as L
from svdkern.launch import acc_dtype

if interpreter_enabled():  # the kernels would hold the interpreter's single config
    raise RuntimeError("bench.kernel_resources compiles for a GPU: run it without "
                       "TRITON_INTERPRET")

TARGET = GPUTarget("cuda", 90, 32)
R_PADS = (16, 64, 128)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
# The representative layer call: GEMM rows, in and out features (GPT-2 MLP, 4096 tokens).
LAYER_CALL = (4096, 768, 3072)


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


@contextlib.contextmanager
def _patched(module, name: str, value):
    """`module.name` is `value` while the block runs (yields `value`)."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield value
    finally:
        setattr(module, name, original)


def _bind(kernel, recorder: _Recorder, cfg: triton.Config | None, overrides: dict):
    """Triton's binder on the recorded launch, as a launch binds it: (JITFunction, backend,
    launch kwargs, bound args, specialization, options)."""
    fn = kernel
    while not isinstance(fn, JITFunction):  # autotuners (and heuristics) wrap the JITFunction
        fn = fn.fn
    kwargs = {**recorder.kwargs, **overrides}
    if cfg is not None:
        kwargs.update(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*recorder.args, **kwargs)
    return fn, backend, kwargs, bound, specialization, options


def compile_launch(kernel, recorder: _Recorder, cfg: triton.Config | None = None, **overrides):
    """Compile `kernel` (a JITFunction or an autotuner around one) for sm_90 with the
    recorded launch's arguments, specialized by Triton's binder as a launch would, under
    `cfg`'s block sizes, warps and stages; `overrides` replace recorded constexprs."""
    fn, backend, kwargs, bound, specialization, options = _bind(kernel, recorder, cfg, overrides)
    options, signature, constants, attrs = fn._pack_args(backend, kwargs, bound,
                                                        specialization, options)
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=TARGET,
                          options=options.__dict__)


def compile_key(kernel, recorder: _Recorder, cfg: triton.Config | None = None) -> str:
    """What Triton compiles one binary per (for one config): the recorded launch's argument
    specialization and constexpr values."""
    fn, _, kwargs, _, specialization, _ = _bind(kernel, recorder, cfg, {})
    constexprs = sorted((k, str(v)) for k, v in kwargs.items()
                        if k in {p.name for p in fn.params if p.is_constexpr})
    return repr((specialization, constexprs))


def usage(kernel) -> dict:
    """REG and STACK (bytes per thread, spills) from cuobjdump; shared bytes from Triton."""
    tool = getattr(getattr(triton, "knobs", None), "nvidia", None)
    tool = (tool.cuobjdump.path if tool is not None else
            Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    return {"regs": int(re.search(r"REG:(\d+)", text).group(1)),
            "stack": int(re.search(r"STACK:(\d+)", text).group(1)),
            "shared": kernel.metadata.shared, "mma": matrix_instructions(kernel),
            "wide_loads": wide_load_share(kernel)}


def wide_load_share(kernel) -> float:
    """Share of the global-memory load instructions in the PTX (plain loads and async
    copies to shared memory) that move 16 bytes: memory-bound code wants them all wide."""
    ptx = kernel.asm["ptx"]
    copies = [int(size, 0) for size in
              re.findall(r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-f]+|\d+)", ptx)]
    loads = [(int(vec or "1") * int(bits)) // 8 for vec, bits in
             re.findall(r"ld\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s", ptx)]
    sizes = copies + loads
    return sum(size == 16 for size in sizes) / max(1, len(sizes))


def matrix_instructions(kernel) -> str:
    """The matrix instructions in the PTX: "wgmma" (sm_90 warpgroup MMA), "mma" (warp-level
    tensor-core MMA) or "fma" (none: the dots became scalar FMAs)."""
    ptx = kernel.asm["ptx"]
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if re.search(r"\bmma\.sync", ptx) else "fma"


def _layer_operands(dtype: str, rank: int) -> tuple[torch.Tensor, ...]:
    B, n, m = LAYER_CALL
    dt = DTYPES[dtype]
    return (torch.empty(B, n, dtype=dt), torch.empty(m, rank, dtype=dt),
            torch.empty(rank, dtype=dt), torch.empty(n, rank, dtype=dt))


def compile_forward(dtype: str, r_pad: int, cfg: triton.Config, precision: str = "ieee",
                    has_bias: bool = True, rank: int | None = None):
    """The forward kernel as `svd_linear_fwd` launches it on the representative call at
    `rank` (default `r_pad`)."""
    x, U, s, V = _layer_operands(dtype, rank or r_pad)
    bias = torch.empty(U.shape[0], dtype=x.dtype) if has_bias else None
    with _patched(L, "_fwd_kernel", _Recorder()) as rec, \
            _patched(L, "_target_programs", lambda device: 264):
        L.launch_forward(x, U, s, V, bias)
    return compile_launch(L._fwd_kernel, rec, cfg, PRECISION=precision)


def compile_backward(dtype: str, r_pad: int, cfg: triton.Config, precision: str = "ieee",
                     dx: bool = True, db: bool = True, rank: int | None = None):
    """The backward row-block kernel as `svd_linear_bwd_rows` launches it."""
    x, U, s, V = _layer_operands(dtype, rank or r_pad)
    dy = torch.empty(x.shape[0], U.shape[0], dtype=x.dtype)
    with _patched(L, "_bwd_rows_kernel", _Recorder()) as rec:
        L.launch_backward_rows(dy, x, U, s, V, dx, db)
    return compile_launch(L._bwd_rows_kernel, rec, cfg, PRECISION=precision)


def _regularizer_operands(dtype: str, aligned: bool):
    """Factors of mixed shapes (tall, square, a small rank) in one flat buffer, with their
    table; with `aligned`, a mix `aligned_layout` accepts. Built directly, not by
    `pack_matrices`, which reads bf16 as fp32 on CPU (for the interpreter): the GPU launch
    reads bf16."""
    shapes = ((2304, 256), (512, 512), (3072, 48), (5, 8 if aligned else 1))
    flat = torch.empty(sum(rows * r for rows, r in shapes), dtype=DTYPES[dtype])
    table, gram_numel = O.matrix_table(tuple((rows, r, False) for rows, r in shapes), flat.device)
    return flat, table, shapes, gram_numel


def compile_gram(dtype: str, cfg: triton.Config, precision: str = "ieee",
                 aligned: bool = False):
    """The Gram + loss kernel as `orthogonality.gram_loss` launches it at `precision`
    ("ieee", "tf32", "bf16": the regularizer's setting)."""
    flat, table, shapes, gram_numel = _regularizer_operands(dtype, aligned)
    acc = acc_dtype(DTYPES[dtype])
    with _patched(O, "_gram_loss_tuned", _Recorder()) as rec:
        O.gram_loss(flat, table, shapes, gram_numel, acc, aligned, precision)
    return compile_launch(O._gram_loss_tuned, rec, cfg)


def compile_grad(dtype: str, cfg: triton.Config, precision: str = "ieee",
                 aligned: bool = False):
    """The gradient kernel as `orthogonality.grad` launches it at `precision`."""
    flat, table, shapes, gram_numel = _regularizer_operands(dtype, aligned)
    acc = acc_dtype(DTYPES[dtype])
    with _patched(O, "_grad_tuned", _Recorder()) as rec:
        O.grad(flat, table, shapes, torch.empty(gram_numel, dtype=acc), torch.ones((), dtype=acc),
               aligned, precision)
    return compile_launch(O._grad_tuned, rec, cfg)


def compile_sparsity(dtype: str, hoyer: bool):
    """The segmented L1 / Hoyer kernel as `sparsity.loss_and_grad` launches it."""
    lengths = (256, 48, 1, 300)
    flat = torch.empty(sum(lengths), dtype=DTYPES[dtype])
    acc = acc_dtype(DTYPES[dtype])
    with _patched(S, "_sparsity_kernel", _Recorder()) as rec:
        S.loss_and_grad(flat, S.segment_offsets(lengths, flat.device), len(lengths), hoyer, acc)
    return compile_launch(S._sparsity_kernel, rec)


def layer_rows(dtype: str) -> list[dict]:
    """Every layer-kernel config at each rank padding, compiled at ranks R_PAD, R_PAD - 8
    (a multiple of 8, not of 16) and R_PAD - 1."""
    if dtype == "fp64":
        return []  # the fused layer kernels take fp32/fp16/bf16 only
    itemsize = DTYPES[dtype].itemsize
    precision = "tf32" if dtype == "fp32" else "ieee"
    out = []
    for r_pad in R_PADS:
        block_b = L._bwd_block_b(r_pad)
        for kernel, configs, build, accumulators in (
                ("forward", L.FWD_CONFIGS, compile_forward, 1),
                ("backward rows", L.BWD_CONFIGS, compile_backward, 2)):
            for cfg in configs:
                fixed = {} if "BLOCK_B" in cfg.kwargs else {"BLOCK_B": block_b}
                usages = [usage(build(dtype, r_pad, cfg, precision, rank=rank))
                          for rank in (r_pad, r_pad - 8, r_pad - 1)]
                footprint = L.register_footprint(cfg, cfg.kwargs.get("BLOCK_B", block_b),
                                                 r_pad, itemsize, accumulators)
                out.append(_row(kernel, dtype, r_pad, cfg, usages, footprint, **fixed))
    return out


def orthogonality_rows(dtype: str) -> list[dict]:
    """Every orthogonality config, for any layout and for the aligned one (the factors'
    strides come from the table at run time)."""
    precision = "tf32" if dtype == "fp32" else "ieee"
    return ([_row(f"orthogonality {name}", dtype, None, cfg,
                  [usage(build(dtype, cfg, precision, aligned)) for aligned in (False, True)])
             for name, build, configs in (("Gram + loss", compile_gram, O.GRAM_CONFIGS),
                                          ("gradient", compile_grad, O.GRAD_CONFIGS))
             for cfg in configs])


def _row(kernel: str, dtype: str, r_pad: int | None, cfg: triton.Config, usages: list[dict],
         footprint: float | None = None, **fixed: int) -> dict:
    blocks = " ".join(f"{k.removeprefix('BLOCK_')}={v}"
                      for k, v in sorted({**fixed, **cfg.kwargs}.items()))
    return {"kernel": kernel, "dtype": dtype, "R_PAD": r_pad, "blocks": blocks,
            "warps": cfg.num_warps, "stages": cfg.num_stages, "footprint": footprint,
            **{k: [u[k] for u in usages]
               for k in ("regs", "stack", "shared", "mma", "wide_loads")}}


def table(results: list[dict]) -> str:
    budget = L._REGISTER_BUDGET
    B, n, m = LAYER_CALL
    lines = [f"# Kernel resources on sm_90 (compiled, not run), "
             f"{datetime.date.today().isoformat()}", "",
             f"Triton {triton.__version__}, `python -m bench.kernel_resources`. Each kernel is "
             f"compiled as its launcher launches it (Triton's binder specializes the arguments: "
             f"aligned pointers, unit strides as constants, sizes divisible by 16): layer "
             f"kernels on x ({B}, {n}) -> ({m}) at ranks R_PAD, R_PAD - 8 and R_PAD - 1 (the "
             f"three values in each cell: factor rows 16 bytes apart as Triton sees them, "
             f"as the kernels are told for a rank that is a multiple of 8, and unaligned), "
             f"orthogonality kernels on a packed mix of factors, for any layout and for the "
             f"aligned one (`aligned_layout`: row-major, ranks multiples of 8; the two values "
             f"in each cell). footprint = fp32 values per "
             f"thread a layer kernel keeps live (`register_footprint`); layer configs above "
             f"{budget} are pruned before autotuning (kept: no). stack = bytes per thread "
             f"spilled to local memory. fp32 rows use TF32 dots (exact fp32 has no "
             f"tensor-core path). MMA = the matrix instructions in the PTX (wgmma: "
             f"sm_90 warpgroup MMA; mma: warp-level tensor-core MMA; fma: none, scalar FMAs). "
             f"16B loads = share of the global load instructions (loads and async copies) "
             f"that move 16 bytes. The orthogonality kernels tune among every config listed.",
             "",
             "| kernel | dtype | R_PAD | blocks | warps | stages | footprint | kept | regs | "
             "stack | shared KiB | MMA | 16B loads |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(values, scale=1):
        return " / ".join(v if isinstance(v, str) else f"{v / scale:.0f}" for v in values)
    for r in results:
        fp = r["footprint"]
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['R_PAD'] or '-'} | {r['blocks']} | "
                     f"{r['warps']} | {r['stages']} | {'-' if fp is None else f'{fp:.0f}'} | "
                     f"{'yes' if fp is None or fp <= budget else 'no'} | {cell(r['regs'])} | "
                     f"{cell(r['stack'])} | {cell(r['shared'], 1024)} | "
                     f"{' / '.join(dict.fromkeys(r['mma']))} | "
                     f"{' / '.join(f'{100 * w:.0f}%' for w in r['wide_loads'])} |")
    for name, group in (("Layer kernels", [r for r in results if r["footprint"] is not None]),
                        ("Orthogonality kernels", [r for r in results if r["footprint"] is None])):
        kept = [max(r["stack"]) for r in group if r["footprint"] is None or r["footprint"] <= budget]
        dropped = [max(r["stack"]) for r in group
                   if r["footprint"] is not None and r["footprint"] > budget]
        if group:
            pruned = (f"; {len(dropped)} pruned, {sum(s > 0 for s in dropped)} spilling, up to "
                      f"{max(dropped)} bytes" if dropped else "")
            lines += ["", f"{name}: {len(kept)} configs tuned, {sum(s > 0 for s in kept)} "
                      f"spilling, at most {max(kept, default=0)} bytes{pruned}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", choices=("bf16", "fp16", "fp32", "fp64"),
                        default=["bf16", "fp32"], help="fp64: orthogonality kernels only")
    parser.add_argument("--kernels", nargs="+", choices=("layers", "orthogonality"),
                        default=["layers", "orthogonality"])
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    makers = {"layers": layer_rows, "orthogonality": orthogonality_rows}
    text = table([r for kernels in args.kernels for dtype in args.dtypes
                  for r in makers[kernels](dtype)])
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
