"""`python -m bench.report`: run the benchmark cases, each against its alternatives, and
write `bench/results/<device>-<date>.json` (every measurement) and `.md` (the tables).

    python -m bench.report                      # every group, preset gpu on CUDA else cpu
    python -m bench.report --preset cpu --only layers regularizer --models gpt2
    python -m bench.report --only layers --cases 'gpt2.*' '*-r48'   # a subset of the cases

A subset run (`--only`, `--models`, `--cases`) names its files after the subset, so runs split
to fit a time limit never overwrite each other; each file holds the ceilings of its own run.
Both files are rewritten after every measurement, so a run cut short keeps what it timed.

Times are medians (CUDA events via triton.testing.do_bench on GPU, perf_counter on CPU).
The roofline ceilings (copy bandwidth, matrix rate) are measured at the start of the same
run; a case's floor is max(FLOPs / matrix rate, bytes / bandwidth) from `bench.cost`.
Ratios are `time of the alternative / time of svdkern`: above 1, svdkern is faster.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

import svdkern
from svdkern import backend, dispatch, reference

from . import cost
from .cases import (INFERENCE_ALTERNATIVES, INFERENCE_RANK_FRACTION, LAYER_ALTERNATIVES, MODELS,
                    INIT_ALTERNATIVES, INIT_SIZES, REGULARIZER_ALTERNATIVES,
                    REGULARIZER_PRECISION, STEP_ALTERNATIVES,
                    TRADEOFF_ALTERNATIVES, ConvShape, LayerShape, conv_spec, crossover_case,
                    crossover_paths, crossover_shapes, inference_case, init_case, layer_case,
                    layer_shapes, regularizer_case, regularizer_work, step_case,
                    tradeoff_case, tradeoff_shapes)
from .config import PRESETS, Preset, default_device
from .timing import measure_ceilings, time_ms

GROUPS = ("layers", "crossover", "tradeoffs", "init", "regularizer", "step", "inference")
MODEL_GROUPS = ("regularizer", "step", "inference")  # the groups that --models selects for
RESULTS = Path(__file__).resolve().parent / "results"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def record(group: str, case: str, alternative: str, timing: dict, ceilings: dict,
           flops: int | None = None, nbytes: int | None = None,
           rate: str = "matmul_tflops") -> dict:
    """One result row: `timing` (bench.timing.time_ms), and with the work given, TFLOP/s,
    GB/s and the roofline floor at the ceiling `rate`."""
    ms = timing["time_ms"]
    row = {"group": group, "case": case, "alternative": alternative, **timing,
           "flops": flops, "bytes": nbytes}
    if flops is not None and nbytes is not None:
        floor = cost.floor_ms(flops, nbytes, ceilings, rate)
        row.update(tflops=flops / (ms * 1e9), gbps=nbytes / (ms * 1e6), floor_ms=floor,
                   floor_fraction=floor / ms, floor_rate=rate)
    return row


def run(p: Preset, device: torch.device, groups: list[str], models: tuple[str, ...] = MODELS,
        log=print, cases: list[str] | None = None, on_row=None) -> dict:
    """Time every selected case against its alternatives. `cases`: glob patterns on the
    layer and crossover case ids (None: all). `on_row(report)` is called after each
    measurement with the report so far, so a run cut short still leaves its rows."""
    meta = _meta(p, device)
    ceilings = measure_ceilings(device, p.dtype, max(p.min_time_s, 0.2))
    log(f"ceilings: {ceilings}")
    rows: list[dict] = []
    report = {"meta": meta, "ceilings": ceilings, "results": rows}

    def timed(group, case, alternative, build, extra=None, **work):
        """Build the case (`build()` returns the callable) and time it; a case that fails
        is recorded with its error and the run goes on (an OOM or a compiler error in one
        case must not cost the rest of the group)."""
        try:
            row = record(group, case, alternative, time_ms(build(), device, p.min_time_s),
                         ceilings, **work)
            log(f"{group:12s} {case:55s} {alternative:20s} {row['time_ms']:10.4f} ms")
        except Exception as exc:  # noqa: BLE001 (recorded, reported in the markdown)
            row = failed(group, case, alternative, exc)
        rows.append({**row, **(extra or {})})
        if on_row is not None:
            on_row(report)

    def failed(group, case, alternative, exc) -> dict:
        row = {"group": group, "case": case, "alternative": alternative,
               "time_ms": None, "error": f"{type(exc).__name__}: {exc}"[:500]}
        log(f"{group:12s} {case:55s} {alternative:20s} ERROR {row['error'][:200]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row

    def selected(shapes):
        return [s for s in shapes
                if cases is None or any(fnmatch.fnmatchcase(s.id, pat) for pat in cases)]

    itemsize = torch.empty((), dtype=p.dtype).element_size()
    if "layers" in groups:
        for shape in selected(layer_shapes(p)):
            for alt in LAYER_ALTERNATIVES:
                timed("layers", shape.id, alt, lambda: layer_case(shape, alt, p, device),
                      flops=shape.flops(alt), nbytes=shape.bytes(alt, itemsize))
    if "tradeoffs" in groups:
        for shape in selected(tradeoff_shapes(p)):
            for alt in TRADEOFF_ALTERNATIVES:
                work = "dense" if alt == "dense" else "chain"
                timed("tradeoffs", shape.id, alt, lambda: tradeoff_case(shape, alt, p, device),
                      flops=shape.flops(work), nbytes=shape.bytes(work, itemsize),
                      extra=dict(layer=f"{shape.model}.{shape.layer}", rows=shape.rows,
                                 n=shape.n, m=shape.m, rank=shape.rank))
    if "init" in groups:
        for size in INIT_SIZES:
            for alt in INIT_ALTERNATIVES:
                timed("init", f"{size}x{size}", alt, lambda: init_case(size, alt, device))
    if "crossover" in groups:
        for shape in selected(crossover_shapes(p)):
            dispatched = dispatch_path(shape, p, device)
            for path in crossover_paths(shape, p, device):
                if path == "fused" and device.type != "cuda":
                    continue  # off a GPU the fused path is Triton's interpreter: not timed
                kind = " (conv)" if isinstance(shape, ConvShape) else ""
                timed("crossover", shape.id, path,
                      lambda: crossover_case(shape, path, p, device), flops=shape.flops(path),
                      extra=dict(layer=f"{shape.model}.{shape.layer}{kind}", rows=shape.rows,
                                 n=shape.n, m=shape.m, rank=shape.rank, dispatch=dispatched))
    for model in models:
        if "regularizer" in groups:
            try:  # the first use of the SVD model: its decomposition may fail (OOM)
                work = regularizer_work(model, p, device)
            except Exception as exc:  # noqa: BLE001 (recorded; step and inference go on)
                rows.extend(failed("regularizer", model, alt, exc)
                            for alt in REGULARIZER_ALTERNATIVES)
                work = None
            if work is not None:
                mats, flops, nbytes = work
                for alt in REGULARIZER_ALTERNATIVES:  # fp32 factors
                    timed("regularizer", f"{model} ({mats} matrices)", alt,
                          lambda: regularizer_case(model, alt, p, device), flops=flops,
                          nbytes=nbytes, rate=regularizer_rate(alt, device))
        if "step" in groups:
            for alt in STEP_ALTERNATIVES:
                timed("step", model, alt, lambda: step_case(model, alt, p, device))
        if "inference" in groups:
            for alt in INFERENCE_ALTERNATIVES:
                timed("inference", model, alt, lambda: inference_case(model, alt, p, device))
    return report


def _meta(p: Preset, device: torch.device) -> dict:
    """What ran, where and when (the start of the run)."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()})",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "preset": p.name, "dtype": str(p.dtype).replace("torch.", ""),
        "compile_dynamic": p.compile_dynamic, "compile_backend": p.compile_backend,
        "torch": torch.__version__,
        "triton": _version("triton"), "svdkern": svdkern.__version__,
        "svdkern_backend": _auto_backend(device),
        "command": "python -m " + " ".join(["bench.report", *sys.argv[1:]]),
    }


def regularizer_rate(alternative: str, device: torch.device) -> str:
    """The ceiling a regularizer alternative's floor uses: fp32 without TF32 for IEEE dots,
    the matrix rate (bf16) for TF32 and bf16 dots (optimistic for TF32, half that rate)."""
    precision = reference.orthogonality_precision(REGULARIZER_PRECISION.get(alternative, "ieee"),
                                                  torch.float32, device)
    return "fp32_ieee_tflops" if precision == "ieee" else "matmul_tflops"


def dispatch_path(shape: LayerShape | ConvShape, p: Preset, device: torch.device) -> str:
    """The path `svdkern.ops` (backend auto) takes for this case on `device` (the plan
    reads shapes, dtype and device only: expanded scalars allocate nothing)."""
    def like(*size: int) -> torch.Tensor:
        return torch.empty((), device=device, dtype=p.dtype).expand(*size)
    r = shape.rank
    with backend.use("auto"):
        if isinstance(shape, ConvShape):
            spec = conv_spec(shape)
            rows, cols = spec.matrix_shape
            return dispatch.explain(like(shape.images, shape.channels, shape.side, shape.side),
                               like(1, rows, r), like(1, r), like(1, cols, r), spec=spec).path
        return dispatch.explain(like(shape.rows, shape.n), like(shape.m, r), like(r),
                           like(shape.n, r)).path


def _auto_backend(device: torch.device) -> str:
    """What the "svdkern" alternative (backend auto) runs on this device."""
    with backend.use("auto"):
        return backend.resolve(device)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


# ----------------------------------------------------------------------------- markdown
def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t:.3g}"


def _x(num: float | None, den: float | None) -> str:
    return "-" if num is None or den is None else f"{num / den:.2f}x"


def _table(title: str, header: list[str], cells: list[list[str]], note: str = "") -> list[str]:
    """A markdown section: title, optional note, one table row per entry of `cells`."""
    return ([f"## {title}", ""] + ([note, ""] if note else [])
            + ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(row) + " |" for row in cells] + [""])


def _by_case(rows: list[dict], group: str) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row["group"] == group:
            out.setdefault(row["case"], {})[row["alternative"]] = row
    return out


def _t(alts: dict, name: str) -> float | None:
    """Time of alternative `name` (None: not timed, or it failed)."""
    return alts[name]["time_ms"] if name in alts else None


def markdown(report: dict) -> str:
    meta, ceil, rows = report["meta"], report["ceilings"], report["results"]
    versus_svdkern = any(row["group"] != "crossover" for row in rows)
    lines = [
        f"# svdkern benchmarks: {meta['device']}, {meta['date_utc']} UTC", "",
        f"Command: `{meta['command']}` (preset `{meta['preset']}`, {meta['dtype']}; torch "
        f"{meta['torch']}, triton {meta['triton']})." + (
            f" On this device `svdkern` (backend auto) runs the **{meta['svdkern_backend']}** "
            "path." if versus_svdkern else ""),
        f"Ceilings measured in this run: copy {ceil['copy_gbps']:.1f} GB/s "
        f"({ceil['copy_bytes'] >> 20} MiB moved), matmul {ceil['matmul_tflops']:.3g} TFLOP/s "
        f"({ceil['matmul_n']}^3, {ceil['matmul_dtype']}; fp32 without TF32 "
        f"{ceil['fp32_ieee_tflops']:.3g}). Times are medians in ms" + (
            "; `A/svdkern` = time of A / time of svdkern (above 1: svdkern faster)."
            if versus_svdkern else "."), ""]
    layers = _by_case(rows, "layers")
    if layers:
        lines += ["## Layer forward + backward (`x (B, n) -> (B, m)` at rank r)", "",
                  "| case | dense | eager ref | compiled ref | svdkern | svdkern TFLOP/s | GB/s "
                  "| floor | % of floor | dense/svdkern | eager/svdkern | compiled/svdkern "
                  "| svdkern host ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for case, alts in layers.items():
            k = alts.get("svdkern")
            if k is None or k["time_ms"] is None:
                continue  # cut short before svdkern was timed, or it failed (see Errors)
            lines.append(
                f"| {case} | {_ms(_t(alts, 'dense'))} | {_ms(_t(alts, 'eager reference'))} | "
                f"{_ms(_t(alts, 'compiled reference'))} | {_ms(k['time_ms'])} | "
                f"{k['tflops']:.3g} | {k['gbps']:.3g} | {_ms(k['floor_ms'])} | "
                f"{100 * k['floor_fraction']:.1f}% | {_x(_t(alts, 'dense'), k['time_ms'])} | "
                f"{_x(_t(alts, 'eager reference'), k['time_ms'])} | "
                f"{_x(_t(alts, 'compiled reference'), k['time_ms'])} | "
                f"{_ms(k.get('host_ms'))} |")
        lines += ["", "TFLOP/s and the floor count the cheaper of the factorized chain and the "
                  "materialized path (bench/cost.py); dense rows count the dense GEMMs. "
                  "`host ms`: Python's time to issue one call (GPU only); near the svdkern "
                  "time, the row measures launch overhead rather than kernels.", ""]
    crossover = _by_case(rows, "crossover")
    if crossover:
        lines += ["## Dispatch crossovers (forward + backward of each path, forced)", "",
                  "| layer | n x m (GEMM view) | r | rows | chain | materialized | fused | fastest | "
                  "dispatch picks | dispatch / fastest |", "|---|---|---|---|---|---|---|---|---|---|"]
        for alts in crossover.values():
            first = next(iter(alts.values()))
            timed_alts = [a for a in alts if alts[a]["time_ms"] is not None]
            if not timed_alts:
                continue
            fastest = min(timed_alts, key=lambda a: alts[a]["time_ms"])
            picked = first["dispatch"]
            lines.append(
                f"| {first['layer']} | {first['n']} x {first['m']} | {first['rank']} | "
                f"{first['rows']} | {_ms(_t(alts, 'chain'))} | {_ms(_t(alts, 'materialized'))} | "
                f"{_ms(_t(alts, 'fused'))} | {fastest} | {picked} | "
                f"{_x(_t(alts, picked), alts[fastest]['time_ms'])} |")
        lines += ["", "`dispatch / fastest`: time of the path `svdkern.ops` picks over the fastest "
                  "path measured (1.00x: the dispatch picked the fastest).", ""]
    steps = _by_case(rows, "step")
    reg = _by_case(rows, "regularizer")
    if reg:
        lines += ["## Regularizer loss + backward over all SVD layers (orthogonality + Hoyer)",
                  "", "`svdkern` runs the default precision (TF32 on a GPU, IEEE elsewhere); "
                  "`ieee` and `bf16` the others (docs/SPEC.md section 4).", "",
                  "| model | eager loop | compiled loop | svdkern ieee | svdkern | svdkern bf16 "
                  "| floor | % of floor | eager/svdkern | compiled/svdkern "
                  "| share of svdkern training step |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for case, alts in reg.items():
            k = alts.get("svdkern")
            if k is None or k["time_ms"] is None:
                continue
            step = _t(steps.get(case.split(" ")[0], {}), "svdkern")
            share = "-" if step is None else f"{100 * k['time_ms'] / step:.1f}%"
            lines.append(f"| {case} | {_ms(_t(alts, 'eager loop'))} | "
                         f"{_ms(_t(alts, 'compiled loop'))} | {_ms(_t(alts, 'svdkern ieee'))} | "
                         f"{_ms(k['time_ms'])} | {_ms(_t(alts, 'svdkern bf16'))} | "
                         f"{_ms(k['floor_ms'])} | {100 * k['floor_fraction']:.1f}% | "
                         f"{_x(_t(alts, 'eager loop'), k['time_ms'])} | "
                         f"{_x(_t(alts, 'compiled loop'), k['time_ms'])} | {share} |")
        lines += ["", "The floor counts the fp32 factors' work at the fp32 rate without TF32 "
                  "for IEEE dots, at the matrix (bf16) rate for TF32 and bf16 ones.", ""]
    init = _by_case(rows, "init")
    if init:
        lines += _table("A layer built from scratch",
                        ["layer", "nn.Linear", "two orthogonal_", "SVDLinear",
                         "SVDLinear / two orthogonal_"],
                        [[case, _ms(_t(alts, "nn.Linear")), _ms(_t(alts, "two orthogonal_")),
                          _ms(_t(alts, "SVDLinear")),
                          _x(_t(alts, "SVDLinear"), _t(alts, "two orthogonal_"))]
                         for case, alts in init.items()])
    tradeoffs = _by_case(rows, "tradeoffs")
    if tradeoffs:
        lines += _table(
            "Chain tradeoffs (forward + backward, with a bias)",
            ["layer", "n x m", "r", "rows", "dense", "chain", "chain, bias apart",
             "apart / chain", "chain / dense"],
            [[f["layer"], f"{f['n']} x {f['m']}", str(f["rank"]), str(f["rows"]),
              _ms(_t(alts, "dense")), _ms(_t(alts, "chain")), _ms(_t(alts, "chain, bias apart")),
              _x(_t(alts, "chain, bias apart"), _t(alts, "chain")),
              _x(_t(alts, "chain"), _t(alts, "dense"))]
             for alts in tradeoffs.values() for f in [next(iter(alts.values()))]],
            "`chain`: the bias in the last GEMM's epilogue (svdkern's chain); `chain, bias "
            "apart`: a separate add over y, as before; ranks above 128 run the chain "
            "(docs/SPEC.md section 3).")
    if steps:
        lines += ["## Training step (forward, backward, regularizer, Adam)", "",
                  "| model | dense | SVD reference | svdkern | svdkern/dense time "
                  "| SVD reference/svdkern |", "|---|---|---|---|---|---|"]
        for case, alts in steps.items():
            k = _t(alts, "svdkern")
            lines.append(f"| {case} | {_ms(_t(alts, 'dense'))} | "
                         f"{_ms(_t(alts, 'SVD reference'))} | {_ms(k)} | "
                         f"{_x(k, _t(alts, 'dense'))} | {_x(_t(alts, 'SVD reference'), k)} |")
        lines.append("")
    infer = _by_case(rows, "inference")
    if infer:
        frac = INFERENCE_RANK_FRACTION
        lines += [f"## Inference after truncating every layer to {frac:g} of its rank", "",
                  "| model | dense | exported low-rank | speed-up |", "|---|---|---|---|"]
        for case, alts in infer.items():
            lines.append(f"| {case} | {_ms(_t(alts, 'dense'))} | "
                         f"{_ms(_t(alts, 'exported low-rank'))} | "
                         f"{_x(_t(alts, 'dense'), _t(alts, 'exported low-rank'))} |")
        lines.append("")
    errors = [row for row in rows if row.get("error")]
    if errors:
        lines += ["## Errors (cases that failed; the run went on)", "",
                  "| group | case | alternative | error |", "|---|---|---|---|"]
        lines += [f"| {r['group']} | {r['case']} | {r['alternative']} | "
                  f"{r['error'][:200].replace('|', '/')} |" for r in errors]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="sizes (default: gpu on CUDA, cpu otherwise)")
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="stacks of the whole-model groups")
    parser.add_argument("--cases", nargs="+", metavar="GLOB",
                        help="layer and crossover cases whose id matches one of these globs "
                             "(default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    p = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    args.out.mkdir(parents=True, exist_ok=True)
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    model_groups = any(g in args.only for g in MODEL_GROUPS)
    subset = ([g for g in GROUPS if g in args.only] +
              [m for m in MODELS if m in args.models and model_groups])
    suffix = "" if len(subset) == len(GROUPS) + len(MODELS) else "-" + "-".join(subset)
    if args.cases:
        suffix += "-" + "-".join(re.sub(r"[^A-Za-z0-9]+", "_", c).strip("_") for c in args.cases)
    stem = args.out / f"{device_slug(device)}-{today}{suffix}"

    def write(report: dict) -> None:  # after every row: a run cut short keeps what it timed
        for suffix, text in ((".json", json.dumps(report, indent=1)), (".md", markdown(report))):
            part = stem.with_suffix(suffix + ".part")  # replaced whole: a cut leaves no half file
            part.write_text(text)
            os.replace(part, stem.with_suffix(suffix))
    write(run(p, device, args.only, args.models, log=lambda s: print(s, flush=True),
              cases=args.cases, on_row=write))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
