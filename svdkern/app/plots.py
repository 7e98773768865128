"""PNG plots of the training CLI (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .pipeline import rule_label  # noqa: E402

COLORS = {"svd": "tab:blue", "trp": "tab:orange", "truncate": "tab:green", "dense": "black"}


def plot_spectra(result: dict, path: str) -> None:
    """Singular values per layer: at initialization, before compression, after (kept)."""
    spec = result["spectra"]
    names = list(spec["after"])
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    height = 2.4 * rows + 1.0  # inches; 1.0 for the title, the x labels and the legend
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, height), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes.flat, names)):
        for key, style in (("init", dict(color="0.6", ls="--", label="at initialization")),
                           ("before", dict(color="tab:blue", label="end of training, before "
                                                                   "pruning")),
                           ("after", dict(color="tab:red", marker=".", ls="",
                                          label="kept by pruning, after fine-tuning"))):
            values = spec[key].get(name)
            if values:
                ax.semilogy(range(1, len(values) + 1), [max(v, 1e-12) for v in values], **style)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("singular value (log)", fontsize=7)
        if i >= len(names) - cols:
            ax.set_xlabel("index (largest first)", fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncol=3,
               fontsize=7, frameon=False)
    rule = rule_label(result["threshold"], result["energy"])
    fig.suptitle(f"{result['method']} ({rule}): singular values per layer",
                 fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.75 / height, top=1 - 0.45 / height,
                        hspace=0.55, wspace=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_ranks(result: dict, path: str) -> None:
    """Kept rank against full rank per layer."""
    names = list(result["ranks"])
    kept = [result["ranks"][n][0] for n in names]
    full = [result["ranks"][n][1] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(names) + 2), 3))
    ax.bar(range(len(names)), full, color="0.85", label="full rank")
    ax.bar(range(len(names)), kept, color=COLORS.get(result["method"], "tab:blue"), label="kept")
    ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
    ax.set_ylabel("rank")
    ax.set_xlabel("layer")
    ax.legend(fontsize=8)
    rule = rule_label(result["threshold"], result["energy"])
    ax.set_title(f"{result['method']} ({rule}): rank per layer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_tradeoff(rows: list[dict], path: str) -> None:
    """Test score against FLOPs (fraction of dense, log scale): one line per method through
    its points (the mean over seeds, with the standard deviation as error bars when there
    are several), points labelled by pruning rule, and the dense model (1.0x) as a star
    with its score as a dotted line. Rows are `compare.aggregate`'s, dense first. Points
    far worse than dense (accuracy over 25 points below the best, perplexity over 1.5x the
    dense one) are drawn on the axis edge, labelled with their score."""
    dense, rows = rows[0], rows[1:]
    metric = dense["metric"]
    mean, std = f"{metric}_mean", f"{metric}_std"
    accuracy = metric == "accuracy"
    fig, ax = plt.subplots(figsize=(8, 4.8))
    scores = [r[mean] for r in rows] + [dense[mean]]
    if accuracy:  # the worst score the y axis shows; worse points sit on that edge
        edge = max(min(scores) - 1, max(scores) - 25)
        worse, clip, shown = (lambda v: v < edge), (lambda v: max(v, edge)), "{:.0f}%"
    else:
        edge = min(max(scores) + 0.1, 1.5 * dense[mean])
        worse, clip, shown = (lambda v: v > edge), (lambda v: min(v, edge)), "{:.1f}"
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["flops_ratio_mean"])
        xs = [r["flops_ratio_mean"] for r in mine]
        ys = [clip(r[mean]) for r in mine]
        ax.errorbar(xs, ys, xerr=[r["flops_ratio_std"] for r in mine],
                    yerr=[0 if worse(r[mean]) else r[std] for r in mine], marker="o",
                    color=COLORS.get(method), label=method, capsize=2)
        for i, (x, y, r) in enumerate(zip(xs, ys, mine)):
            label = (rule_label(r["threshold"], r["energy"]).replace("energy", "e")
                     .replace("threshold", "t") + (" *" if r["chosen"] else "")
                     + (f" ({shown.format(r[mean])})" if worse(r[mean]) else ""))
            # alternate above and below the line, so neighbouring labels do not overlap
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 5 if i % 2 == 0 else -11),
                        textcoords="offset points", color=COLORS.get(method))
    ax.plot([1.0], [clip(dense[mean])], marker="*", markersize=11, color=COLORS["dense"],
            ls="", label=f"dense ({dense[mean]:.2f}{'%' if accuracy else ''})")
    ax.axhline(dense[mean], color=COLORS["dense"], ls=":", lw=1)
    ax.set_xscale("log")
    if accuracy:
        ax.set_ylim(edge - 0.5, min(max(scores) + 1, 100.5))
    else:
        pad = 0.1 * (edge - min(scores)) + 0.05
        ax.set_ylim(min(scores) - pad, edge + pad)
    unit = dense["unit"]
    form = "SVD-form" if dense["cost"] == "flops" else "deployed"
    ax.set_xlabel(f"{form} FLOPs per {unit} / dense FLOPs (log scale)")
    ax.set_ylabel("test accuracy (%)" if accuracy else f"test perplexity per {unit}")
    seeds = dense["seeds"]
    ax.set_title("score against compute" + (f", mean and sd of {seeds} seeds" if seeds > 1 else "")
                 + "; e: energy threshold, t: value threshold"
                 + (", *: chosen on validation" if any(r["chosen"] for r in rows) else ""),
                 fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if accuracy else "upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
