"""`python -m svdkern train|compare` (console script `svdkern`): compress a network with SVD
training, TRP or post-hoc truncation, print the result table and write a JSON of every
number, a markdown report and PNG plots to the output folder."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import fields, replace

import torch

from .compare import Study, aggregate, run_study
from .data import DATASETS, load_dataset
from .models import MODELS
from ..methods.trp import SCHEDULES, SCOPES
from .pipeline import (METHODS, SPARSITY_STRENGTH, TrainConfig, check_trp, dense_baseline,
                       rule_label, run_method)
from .plots import plot_ranks, plot_spectra, plot_tradeoff

COMPARE_ENERGIES = (0.002, 0.01, 0.05, 0.1, 0.2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train and compress one model with one method")
    train.add_argument("--method", choices=METHODS, default="svd",
                       help="compression method (default: %(default)s)")
    train.add_argument("--out", default="svdkern-run", help="output folder (default: %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    compare = sub.add_parser(
        "compare", help="the methods at equal optimizer steps, tuned on a validation split, "
                        "reported on the test split over seeds")
    compare.add_argument("--energies", type=_floats, default=COMPARE_ENERGIES,
                         help="comma-separated energy thresholds (default: "
                              f"{','.join(map(str, COMPARE_ENERGIES))})")
    compare.add_argument("--methods", type=_methods, default=list(METHODS),
                         help="comma-separated methods to run (default: "
                              f"{','.join(METHODS)})")
    compare.add_argument("--seeds", type=_ints, default=(0, 1, 2),
                         help="comma-separated training seeds, each run on the test split "
                              "(default: 0,1,2)")
    compare.add_argument("--lr-factors", type=_floats,
                         help="learning rates tried on the validation split, as multiples of "
                              "each method's default (default: 0.333,1,3)")
    compare.add_argument("--val-fraction", type=float, default=0.2,
                         help="share of the training data held out for tuning; 0: no tuning, "
                              "default learning rates (default: %(default)s)")
    compare.add_argument("--tolerance", type=float,
                         help="a method's operating point: the fewest FLOPs within this of "
                              "the dense model on validation, accuracy points below or "
                              "perplexity percent above (default: 1)")
    compare.add_argument("--out", default="svdkern-compare",
                         help="output folder (default: %(default)s)")
    for p in (train, compare):
        p.add_argument("--model", choices=MODELS, default="cnn",
                       help="network to train (default: %(default)s; lstm: a character "
                            "language model, with --data text)")
        p.add_argument("--data", choices=DATASETS, default="digits",
                       help="data set (default: %(default)s, bundled; text: this Python's "
                            "standard-library source, no download)")
        p.add_argument("--data-dir", help="CIFAR-10 python batches folder (--data cifar10)")
        p.add_argument("--epochs", type=int,
                       help="total epochs per method (default: digits 80, cifar10 164, text 12)")
        p.add_argument("--finetune-epochs", type=int,
                       help="of those, epochs of fine-tuning after pruning (default a quarter)")
        p.add_argument("--batch-size", type=int,
                       help="default: 128 for trp on images; otherwise 32, 100 on cifar10 "
                            "(compare: one batch size for every method)")
        p.add_argument("--optimizer", choices=("adam", "sgd"),
                       help="default adam (svd, truncate; the paper), sgd (trp on images; its "
                            "code)")
        p.add_argument("--lr", type=float,
                       help="default: 0.1 for sgd; for adam 1e-3 on cifar10, else 3e-3 "
                            "(compare: the base the --lr-factors multiply)")
        p.add_argument("--weight-decay", type=float,
                       help="default 0 (svd, truncate; trp on text), 1e-4 (trp on images; its "
                            "code), whatever --optimizer")
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
                       help="TRP: every matrix (linears, convs, RNN and attention "
                            "matrices), or official (the 3x3 convs but the first); default: "
                            "%(default)s")
        p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
        p.add_argument("--train-samples", type=int,
                       help="train on the first N training samples only (quick checks)")
    train.add_argument("--threshold", type=float,
                       help="prune by value instead: keep |s_j| >= this (svd, truncate; the "
                            "official --sensitivity)")
    train.add_argument("--energy", type=float,
                       help="energy threshold: fraction of sum s^2 pruning may drop "
                            "(default: 0.002 on digits, 0.01 on cifar10 and text)")
    return parser


def _listed(convert: type, what: str, example: str):
    """An argparse type: a comma-separated list of `convert` values, or a clear error."""
    def parse(text: str) -> tuple:
        try:
            return tuple(convert(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what} such as {example}, got {text!r}") from None
    return parse


_floats = _listed(float, "numbers", "0.05,0.1")
_ints = _listed(int, "integers", "0,1,2")


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
    if (args.model == "lstm") != (args.data == "text"):
        raise ValueError(f"--model {args.model} does not read --data {args.data}: the lstm "
                         "language model reads --data text, the other models images")
    if args.command == "compare":
        _check_study(args)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this PyTorch build sees no CUDA GPU "
                         f"(torch {torch.__version__}); use --device cpu")


def _check_study(args: argparse.Namespace) -> None:
    """ValueErrors for compare's own options; fills the tuning defaults."""
    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    tuning = {"--lr-factors": args.lr_factors, "--tolerance": args.tolerance}
    if args.val_fraction == 0:
        given = [flag for flag, value in tuning.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: read only when tuning; --val-fraction 0 "
                             "runs every method at its default learning rate, untuned")
    args.lr_factors = args.lr_factors or (1 / 3, 1.0, 3.0)
    args.tolerance = 1.0 if args.tolerance is None else args.tolerance
    if not all(math.isfinite(f) and f > 0 for f in args.lr_factors):
        raise ValueError(f"--lr-factors must be finite and > 0, got {args.lr_factors}")
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise ValueError(f"--tolerance must be finite and >= 0, got {args.tolerance}")
    for flag, values in (("--seeds", args.seeds), ("--energies", args.energies),
                         ("--lr-factors", args.lr_factors), ("--methods", args.methods)):
        if len(set(values)) != len(values):
            raise ValueError(f"{flag} lists a value twice: {','.join(map(str, values))}")


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
        data = load_dataset(args.data, args.data_dir)
        if args.train_samples is not None:
            data = data.head(args.train_samples)
        for method in [args.method] if args.command == "train" else args.methods:
            for energy in energies:  # bad settings: a clear error before any work
                cfg = replace(_config(args, method), energy=energy).resolved()
            if method == "trp":  # what TRP refuses does not depend on the energy
                check_trp(cfg, data)
        if args.command == "compare" and args.val_fraction:
            data.holdout(args.val_fraction)
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
    # the dense model on the same budget (steps: the method's batch size; data), with
    # truncation's optimizer
    dense = dense_baseline(replace(_config(args, "truncate"), batch_size=cfg.resolved().batch_size),
                           data, progress)
    result[f"dense_{data.metric}"], result["dense_steps"] = dense[data.metric], dense["steps"]
    print(headline(result))
    print(result["table"])
    files = {"json": "result.json", "report": "report.md", "spectra": "spectra.png",
             "ranks": "ranks.png", "accuracy_flops": "accuracy_vs_flops.png"}
    out = {k: os.path.join(args.out, v) for k, v in files.items()}
    plot_spectra(result, out["spectra"])
    plot_ranks(result, out["ranks"])
    plot_tradeoff(aggregate([result], [dense], None, _cost(data)), out["accuracy_flops"])
    _write_json(out["json"], result)
    with open(out["report"], "w", encoding="utf-8") as f:
        f.write(train_report(result, files))
    print(f"wrote {', '.join(out.values())}")
    return result


def _cost(data) -> str:
    """The FLOPs a study ranks by: deployed ones; for text the SVD form's (the LSTM's
    matrices merge on export, so its deployed FLOPs stay dense)."""
    return "flops" if data.kind == "text" else "deployed_flops"


def compare(args: argparse.Namespace, data, progress: bool) -> dict:
    study = Study(tuple(args.energies), tuple(args.seeds),
                  tuple(args.lr_factors), args.val_fraction, args.tolerance, _cost(data))
    payload = run_study({m: _config(args, m) for m in args.methods}, data, study, progress)
    table = compare_table(payload["rows"])
    print(table)
    plot_tradeoff(payload["rows"], os.path.join(args.out, "accuracy_vs_flops.png"))
    _write_json(os.path.join(args.out, "compare.json"), payload)
    with open(os.path.join(args.out, "compare.md"), "w", encoding="utf-8") as f:
        f.write("# svdkern compare\n\n" + _config_line(payload["results"][0]) + "\n\n"
                + study_line(study, payload) + "\n\n" + table
                + "\n\n![score vs FLOPs](accuracy_vs_flops.png)\n")
    print(f"wrote {args.out}/compare.json, compare.md, accuracy_vs_flops.png")
    return payload


def _value(metric: str, value: float) -> str:
    """A score as printed: accuracy in percent, perplexity to three decimals."""
    return f"{value:.2f}%" if metric == "accuracy" else f"{value:.3f}"


def _score(metric: str, value: float) -> str:
    return (f"{_value(metric, value)} test accuracy" if metric == "accuracy" else
            f"test perplexity {_value(metric, value)}")


def headline(r: dict) -> str:
    """The reduction, the score and the dense model's first; the details after."""
    metric, unit = r["metric"], r["unit"]
    dense = r.get(f"dense_{metric}")
    dense = "" if dense is None else f" (dense model, same budget: {_value(metric, dense)})"
    rule = rule_label(r["threshold"], r["energy"])
    before = r[f"{metric}_before"]
    return (f"{r['method']} {rule}: {r['dense_flops'] / r['deployed_flops']:.1f}x "
            f"fewer deployed FLOPs than dense at {_score(metric, r[metric])}{dense}\n"
            f"  deployed FLOPs {r['deployed_flops']:,} / {r['dense_flops']:,} per {unit} (SVD "
            f"form {r['flops']:,}), params {r['deployed_params']:,} / {r['dense_params']:,}; "
            f"{metric} before pruning {before:.2f}{'%' if metric == 'accuracy' else ''}")


def compare_table(rows: list[dict]) -> str:
    """Markdown: per method and energy, the mean (and sd) over seeds of the test score and
    FLOPs; each method's operating point, chosen on validation, in bold (marked † instead
    when no energy came within tolerance on validation: its best-scoring one)."""
    dense = rows[0]
    metric, unit, seeds = dense["metric"], dense["unit"], dense["seeds"]
    sd = " (sd)" if seeds > 1 else ""
    factored = dense["cost"] == "flops"
    score = "accuracy %" if metric == "accuracy" else f"perplexity per {unit}"
    head = (f"| method | energy | lr | steps | test {score}, mean{sd} of {seeds} | "
            + (f"SVD-form FLOPs / dense{sd} | deployed / dense |" if factored else
               f"deployed FLOPs / dense{sd} |") + f" deployed params | FLOPs per {unit} |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    digits = 2 if metric == "accuracy" else 3
    for r in rows:
        bold = "**" if r["within_tolerance"] else ""
        cells = [r["method"] + (" †" if r["chosen"] and not r["within_tolerance"] else ""),
                 "-" if r["energy"] is None else f"{r['energy']:g}",
                 f"{r['lr']:.3g}", f"{r['steps']:,}",
                 f"{bold}{r[f'{metric}_mean']:.{digits}f}{bold}"
                 + (f" ({r[f'{metric}_std']:.{digits}f})" if seeds > 1 else ""),
                 f"{bold}{r['flops_ratio_mean']:.3f}{bold}"
                 + (f" ({r['flops_ratio_std']:.3f})" if seeds > 1 else "")]
        if factored:
            cells.append(f"{r['deployed_ratio_mean']:.3f}")
        flops = r["factored_flops_mean"] if factored else r["deployed_flops_mean"]
        cells += [f"{r['deployed_params_mean']:,.0f}", f"{flops:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_line(study: Study, payload: dict) -> str:
    """How the table was made, in one paragraph."""
    tuning = payload["tuning"]
    text = (f"Every method and the dense model: {payload['rows'][0]['steps']:,} optimizer "
            f"steps. Seeds {', '.join(map(str, study.seeds))}, scored on the test split.")
    if tuning:
        metric = payload["rows"][0]["metric"]
        chosen = "; ".join(f"{m} lr {c['lr']:.3g}"
                           + (f", energy {c['energy']:g}" if "energy" in c else "")
                           for m, c in tuning["chosen"].items())
        text += (f" Tuned on a validation split ({study.val_fraction:g} of the training "
                 f"data, seed {study.seeds[0]}): learning rates "
                 f"{', '.join(f'{f:.3g}' for f in study.lr_factors)} times each default; "
                 f"operating point (bold): the fewest FLOPs within {study.tolerance:g} "
                 f"{'points' if metric == 'accuracy' else 'percent'} of dense on validation "
                 f"(†: none was; the best-scoring energy). Chosen: {chosen}.")
    return text


def _config_line(r: dict) -> str:
    c = r["config"]
    keys = ("model", "data", "epochs", "finetune_epochs", "batch_size", "lambda_o", "sparsity",
            "lambda_s", "scheme", "nuclear", "trp_period", "trp_schedule", "trp_scope")
    return "Config: " + ", ".join(f"{k}={c[k]}" for k in keys)


def train_report(r: dict, files: dict) -> str:
    c = r["config"]
    rank_rows = "\n".join(f"| {n} | {k} | {full} |" for n, (k, full) in r["ranks"].items())
    return f"""# svdkern train: {r['method']}

{headline(r)}

Config: {', '.join(f'{k}={v}' for k, v in c.items())}

Training time: {r['seconds']:.1f} s

## Per-layer cost (svdkern.summary; FLOPs per {r['unit']})

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
