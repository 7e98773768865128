"""Registers, spill stack and shared memory of every autotune config of the layer and
orthogonality kernels, compiled for sm_90 by Triton's own ptxas and read back with its
cuobjdump: no GPU needed.

Why: the interpreter runs no compiler, so register pressure, which decides whether a block
shape is worth tuning at all, is invisible to the tests. This table is how
`_REGISTER_BUDGET` in kernels/svd_linear.py and the orthogonality config lists were set;
re-run it after changing a kernel:

    python -m bench.kernel_resources [--dtypes bf16 fp32] [--out bench/results/FILE.md]

It measures the compiler's output, not speed: the autotuner on a GPU still picks among
the configs kept.
"""
from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from svdkern.backend import interpreter_enabled
from svdkern.kernels import COMPILE_OPTIONS
from svdkern.kernels import orthogonality as O
from svdkern.kernels import svd_linear as L

if interpreter_enabled():  # the kernels would hold the interpreter's single config
    raise RuntimeError("bench.kernel_resources compiles for a GPU: run it without "
                       "TRITON_INTERPRET")

TARGET = GPUTarget("cuda", 90, 32)
R_PADS = (16, 64, 128)


def signature(fn, pointer: str, **types: str) -> dict:
    """Every runtime argument of `fn`: the type `types` names, else `pointer` for a `*_ptr`
    argument, else i32 (constexprs are added by `compile_sm90`)."""
    return {p.name: types.get(p.name, pointer if p.name.endswith("_ptr") else "i32")
            for p in fn.params if not p.is_constexpr}


def compile_sm90(fn, signature: dict, constants: dict, cfg: triton.Config):
    constants = {**constants, **cfg.kwargs}
    signature = {**signature, **{k: "constexpr" for k in constants}}
    return triton.compile(ASTSource(fn, signature, constants), target=TARGET,
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                   **COMPILE_OPTIONS})


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
            "shared": kernel.metadata.shared}


def compile_forward(dtype: str, r_pad: int, cfg: triton.Config, precision: str = "ieee",
                    has_bias: bool = True):
    return compile_sm90(L._fwd_kernel.fn, signature(L._fwd_kernel.fn, "*" + dtype),
                        {"HAS_BIAS": has_bias, "R_PAD": r_pad, "PRECISION": precision}, cfg)


def compile_backward(dtype: str, r_pad: int, cfg: triton.Config, precision: str = "ieee",
                     dx: bool = True, db: bool = True):
    fn = L._bwd_rows_kernel.fn
    return compile_sm90(fn, signature(fn, "*" + dtype, ds_part_ptr="*fp32", db_part_ptr="*fp32"),
                        {"COMPUTE_DX": dx, "COMPUTE_DB": db, "R_PAD": r_pad,
                         "PRECISION": precision, "BLOCK_B": L._bwd_block_b(r_pad)}, cfg)


def layer_rows(dtype: str) -> list[dict]:
    if dtype == "fp64":
        return []  # the fused layer kernels take fp32/fp16/bf16 only
    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    precision = "tf32" if dtype == "fp32" else "ieee"
    out = []
    for r_pad in R_PADS:
        for cfg in L.FWD_CONFIGS:
            out.append(_row("forward", dtype, r_pad, cfg,
                            compile_forward(dtype, r_pad, cfg, precision),
                            L.register_footprint(cfg, cfg.kwargs["BLOCK_B"], r_pad, itemsize, 1)))
        block_b = L._bwd_block_b(r_pad)
        for cfg in L.BWD_CONFIGS:
            out.append(_row("backward rows", dtype, r_pad, cfg,
                            compile_backward(dtype, r_pad, cfg, precision),
                            L.register_footprint(cfg, block_b, r_pad, itemsize, 2),
                            BLOCK_B=block_b))
    return out


def orthogonality_rows(dtype: str) -> list[dict]:
    acc, flat = ("*fp64" if dtype == "fp64" else "*fp32"), "*" + dtype
    consts = {"PRECISION": "tf32" if dtype == "fp32" else "ieee"}
    gram = O._gram_loss_kernel
    gram_sig = signature(gram, "", flat=flat, table="*i64", gram=acc, partials=acc)
    grad_sig = signature(O._grad_kernel, "", flat=flat, table="*i64", gram=acc, grad_out=acc,
                         grad=flat)
    return ([_row("orthogonality Gram + loss", dtype, None, cfg,
                  compile_sm90(gram, gram_sig, consts, cfg))
             for cfg in O.GRAM_CONFIGS] +
            [_row("orthogonality gradient", dtype, None, cfg,
                  compile_sm90(O._grad_kernel, grad_sig, consts, cfg))
             for cfg in O.GRAD_CONFIGS])


def _row(kernel: str, dtype: str, r_pad: int | None, cfg: triton.Config, compiled,
         footprint: float | None = None, **fixed: int) -> dict:
    blocks = " ".join(f"{k.removeprefix('BLOCK_')}={v}"
                      for k, v in sorted({**fixed, **cfg.kwargs}.items()))
    return {"kernel": kernel, "dtype": dtype, "R_PAD": r_pad, "blocks": blocks,
            "warps": cfg.num_warps, "stages": cfg.num_stages, "footprint": footprint,
            **usage(compiled)}


def table(results: list[dict]) -> str:
    budget = L._REGISTER_BUDGET
    lines = [f"# Kernel resources on sm_90 (compiled, not run), "
             f"{datetime.date.today().isoformat()}", "",
             f"Triton {triton.__version__}, `python -m bench.kernel_resources`. footprint = fp32 "
             f"values per thread a layer kernel keeps live (`register_footprint`); layer configs "
             f"above {budget} are pruned before autotuning (kept: no). stack = bytes per thread "
             f"spilled to local memory. The orthogonality kernels tune among every config "
             f"listed. Integer arguments are compiled unspecialized (a launch may specialize "
             f"those divisible by 16), so a launch's register count can differ slightly.", "",
             "| kernel | dtype | R_PAD | blocks | warps | stages | footprint | kept | regs | "
             "stack | shared KiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fp = r["footprint"]
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['R_PAD'] or '-'} | {r['blocks']} | "
                     f"{r['warps']} | {r['stages']} | {'-' if fp is None else f'{fp:.0f}'} | "
                     f"{'yes' if fp is None or fp <= budget else 'no'} | {r['regs']} | "
                     f"{r['stack']} | {r['shared'] / 1024:.0f} |")
    for name, group in (("Layer kernels", [r for r in results if r["footprint"] is not None]),
                        ("Orthogonality kernels", [r for r in results if r["footprint"] is None])):
        kept = [r["stack"] for r in group if r["footprint"] is None or r["footprint"] <= budget]
        dropped = [r["stack"] for r in group
                   if r["footprint"] is not None and r["footprint"] > budget]
        if group:
            pruned = (f"; {len(dropped)} pruned, {sum(s > 0 for s in dropped)} spilling, up to "
                      f"{max(dropped)} bytes" if dropped else "")
            lines += ["", f"{name}: {len(kept)} configs tuned, {sum(s > 0 for s in kept)} "
                      f"spilling, at most {max(kept, default=0)} bytes{pruned}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
