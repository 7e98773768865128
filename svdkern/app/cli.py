"""`python -m svdkern train|compare` (console script `svdkern`): compress a network with SVD
training, TRP or post-hoc truncation, print the result table and write a JSON of every
number, a markdown report and PNG plots to the output folder."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields, replace

import torch

from .data import DATASETS, load_dataset
from .models import MODELS
from ..methods.trp import SCHEDULES, SCOPES
from .pipeline import (METHODS, SPARSITY_STRENGTH, TrainConfig, dense_baseline, rule_label,
                       run_method)
from .plots import plot_accuracy_flops, plot_ranks, plot_spectra

COMPARE_ENERGIES = (0.01, 0.05, 0.1, 0.2, 0.3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train and compress one model with one method")
    train.add_argument("--method", choices=METHODS, default="svd",
                       help="compression method (default: %(default)s)")
    train.add_argument("--out", default="svdkern-run", help="output folder (default: %(default)s)")
    compare = sub.add_parser("compare", help="all three methods at several energy thresholds")
    compare.add_argument("--energies", type=_floats, default=COMPARE_ENERGIES,
                         help="comma-separated energy thresholds (default %(default)s)")
    compare.add_argument("--methods", type=_methods, default=list(METHODS),
                         help="comma-separated methods to run (default: "
                              f"{','.join(METHODS)})")
    compare.add_argument("--out", default="svdkern-compare",
                         help="output folder (default: %(default)s)")
    for p in (train, compare):
        p.add_argument("--model", choices=MODELS, default="cnn",
                       help="network to train (default: %(default)s)")
        p.add_argument("--data", choices=DATASETS, default="digits",
                       help="data set (default: %(default)s, bundled)")
        p.add_argument("--data-dir", help="CIFAR-10 python batches folder (--data cifar10)")
        p.add_argument("--epochs", type=int, help="total epochs per method (default: digits 80, cifar10 164)")
        p.add_argument("--finetune-epochs", type=int,
                       help="of those, epochs of fine-tuning after pruning (default a quarter)")
        p.add_argument("--batch-size", type=int, help="default: 128 for trp; for svd and truncate 32 on digits, 100 "
                            "on cifar10")
        p.add_argument("--optimizer", choices=("adam", "sgd"),
                       help="default adam (svd, truncate; the paper), sgd (trp; its code)")
        p.add_argument("--lr", type=float,
                       help="default: 0.1 for sgd; for adam 3e-3 on digits, 1e-3 on cifar10 "
                            "(compare: every method run)")
        p.add_argument("--weight-decay", type=float,
                       help="default 0 (svd, truncate), 1e-4 (trp; its code), whatever --optimizer")
        p.add_argument("--lambda-o", type=float, default=1.0, help="orthogonality weight")
        p.add_argument("--lambda-s", type=float,
                       help="sparsity weight (default: " + ", ".join(
                           f"{v:g} {k}" for k, v in SPARSITY_STRENGTH.items()) + ")")
        p.add_argument("--sparsity", choices=tuple(SPARSITY_STRENGTH), default="hoyer",
                       help="sparsity regularizer on s (default: %(default)s)")
        p.add_argument("--sparsity-start", type=int, default=0,
                       help="epochs of orthogonality-only training before the sparsity term "
                            "is added (the paper's stage 1; --method svd only; default "
                            "%(default)s)")
        p.add_argument("--rank-multiple", type=int, default=1,
                       help="round each kept rank up to a multiple of this (8 suits GPU "
                            "kernels; default %(default)s: the papers' rule)")
        p.add_argument("--scheme", choices=("channel", "spatial"),
                       help="conv matrix layout (default: spatial on digits, channel on "
                            "cifar10)")
        p.add_argument("--nuclear", type=float, default=3e-4, help="TRP nuclear-norm weight")
        p.add_argument("--trp-period", type=int, default=5,
                       help="TRP: truncate every m steps (default: %(default)s)")
        p.add_argument("--trp-schedule", choices=SCHEDULES, default="official",
                       help="TRP: official (truncate before step 0 and every m steps, the "
                            "nuclear term on the step after) or per_step (the paper's loss: "
                            "the nuclear term every step); default: %(default)s")
        p.add_argument("--trp-scope", choices=SCOPES, default="all",
                       help="TRP: all linears and convs, or official (3x3 convs but the "
                            "first); default: %(default)s")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
        p.add_argument("--train-samples", type=int,
                       help="train on the first N training samples only (quick checks)")
    train.add_argument("--threshold", type=float,
                       help="prune by value instead: keep |s_j| >= this (svd, truncate; the "
                            "official --sensitivity)")
    train.add_argument("--energy", type=float,
                       help="energy threshold: fraction of sum s^2 pruning may drop "
                            "(default: 0.002 on digits, 0.01 on cifar10)")
    return parser


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.05,0.1, got {text!r}") from None


def _methods(text: str) -> list[str]:
    methods = text.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}; choose from "
                                         f"{', '.join(METHODS)}")
    return methods


def _check_args(args: argparse.Namespace) -> None:
    """ValueErrors for options that would otherwise be ignored or fail deep in a run."""
    if args.data_dir is not None and args.data != "cifar10":
        raise ValueError(f"--data-dir is read with --data cifar10 only (got --data {args.data})")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this PyTorch build sees no CUDA GPU "
                         f"(torch {torch.__version__}); use --device cpu")


def _config(args: argparse.Namespace, method: str) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["method"] = method
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        energies = [args.energy] if args.command == "train" else args.energies
        for method in [args.method] if args.command == "train" else args.methods:
            for energy in energies:  # bad settings: a clear error before any work
                replace(_config(args, method), energy=energy).resolved()
        data = load_dataset(args.data, args.data_dir)
        if args.train_samples is not None:
            data = data.head(args.train_samples)
    except (FileNotFoundError, ValueError) as exc:
        print(f"svdkern: error: {exc}", file=sys.stderr)
        return 2
    progress = not args.no_progress and sys.stderr.isatty()
    os.makedirs(args.out, exist_ok=True)
    if args.command == "train":
        train(args, data, progress)
    else:
        compare(args, data, progress)
    return 0


def train(args: argparse.Namespace, data, progress: bool) -> dict:
    cfg = _config(args, args.method)
    result = run_method(cfg, data, progress=progress)[0]
    # the dense model on the same budget (steps, data, truncation's optimizer)
    result["dense_accuracy"] = dense_baseline(_config(args, "truncate"), data, progress)["accuracy"]
    print(headline(result))
    print(result["table"])
    files = {"json": "result.json", "report": "report.md", "spectra": "spectra.png",
             "ranks": "ranks.png", "accuracy_flops": "accuracy_vs_flops.png"}
    out = {k: os.path.join(args.out, v) for k, v in files.items()}
    plot_spectra(result, out["spectra"])
    plot_ranks(result, out["ranks"])
    plot_accuracy_flops([result], out["accuracy_flops"], result["dense_accuracy"])
    _write_json(out["json"], result)
    with open(out["report"], "w", encoding="utf-8") as f:
        f.write(train_report(result, files))
    print(f"wrote {', '.join(out.values())}")
    return result


def compare(args: argparse.Namespace, data, progress: bool) -> dict:
    dense = dense_baseline(_config(args, "truncate"), data, progress)
    results = []
    for method in args.methods:
        results += run_method(_config(args, method), data, list(args.energies), progress)
    table = compare_table(results, dense)
    print(table)
    plot_accuracy_flops(results, os.path.join(args.out, "accuracy_vs_flops.png"),
                        dense["accuracy"])
    payload = {"dense": dense, "results": results}
    _write_json(os.path.join(args.out, "compare.json"), payload)
    with open(os.path.join(args.out, "compare.md"), "w", encoding="utf-8") as f:
        f.write("# svdkern compare\n\n" + _config_line(results[0]) + "\n\n" + table +
                "\n\n![accuracy vs FLOPs](accuracy_vs_flops.png)\n")
    print(f"wrote {args.out}/compare.json, compare.md, accuracy_vs_flops.png")
    return payload


def headline(r: dict) -> str:
    """The reduction, the accuracy and the dense model's first; the details after."""
    dense = (f" (dense model, same budget: {r['dense_accuracy']:.2f}%)"
             if "dense_accuracy" in r else "")
    rule = rule_label(r["threshold"], r["energy"])
    return (f"{r['method']} {rule}: {r['dense_flops'] / r['deployed_flops']:.1f}x "
            f"fewer deployed FLOPs than dense at {r['accuracy']:.2f}% test accuracy{dense}\n"
            f"  deployed FLOPs {r['deployed_flops']:,} / {r['dense_flops']:,} per sample, params "
            f"{r['deployed_params']:,} / {r['dense_params']:,}; accuracy before pruning "
            f"{r['accuracy_before']:.2f}%")


def compare_table(results: list[dict], dense: dict) -> str:
    lines = ["| method | energy | accuracy % | FLOPs (deployed) | FLOPs / dense | params | ranks |",
             "|---|---|---|---|---|---|---|",
             f"| dense | - | {dense['accuracy']:.2f} | {dense['flops']:,} | 1.000 | "
             f"{dense['params']:,} | full |"]
    for r in results:
        ranks = " ".join(str(v[0]) for v in r["ranks"].values())
        lines.append(f"| {r['method']} | {r['energy']:g} | {r['accuracy']:.2f} | "
                     f"{r['deployed_flops']:,} | {r['deployed_flops'] / r['dense_flops']:.3f} | "
                     f"{r['deployed_params']:,} | {ranks} |")
    return "\n".join(lines)


def _config_line(r: dict) -> str:
    c = r["config"]
    keys = ("model", "data", "epochs", "finetune_epochs", "seed", "lambda_o", "sparsity",
            "scheme", "nuclear", "trp_period", "trp_schedule", "trp_scope")
    return "Config: " + ", ".join(f"{k}={c[k]}" for k in keys)


def train_report(r: dict, files: dict) -> str:
    c = r["config"]
    rank_rows = "\n".join(f"| {n} | {k} | {full} |" for n, (k, full) in r["ranks"].items())
    return f"""# svdkern train: {r['method']}

{headline(r)}

Config: {', '.join(f'{k}={v}' for k, v in c.items())}

Training time: {r['seconds']:.1f} s

## Per-layer cost (svdkern.summary; FLOPs per sample)

```
{r['table']}
```

Deployed cost counts a layer dense where `r (m + n) >= m n` (as `svdkern.export` ships it).

## Ranks

| layer | kept | full |
|---|---|---|
{rank_rows}

## Plots

![accuracy vs FLOPs]({files['accuracy_flops']})

![ranks]({files['ranks']})

![spectra]({files['spectra']})
"""


def _write_json(path: str, payload) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
