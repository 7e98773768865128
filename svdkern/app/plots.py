"""PNG plots of the training CLI (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"svd": "tab:blue", "trp": "tab:orange", "truncate": "tab:green", "dense": "black"}


def plot_spectra(result: dict, path: str) -> None:
    """Singular values per layer: at initialization, before compression, after (kept)."""
    spec = result["spectra"]
    names = list(spec["after"])
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    height = 2.4 * rows + 0.6  # inches; 0.6 for the title and the bottom axis labels
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, height), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for key, style in (("init", dict(color="0.6", ls="--", label="init")),
                           ("before", dict(color="tab:blue", label="before")),
                           ("after", dict(color="tab:red", marker=".", ls="", label="after"))):
            values = spec[key].get(name)
            if values:
                ax.semilogy(range(1, len(values) + 1), [max(v, 1e-12) for v in values], **style)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{result['method']} (energy {result['energy']}): singular values per layer",
                 fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.3 / height, top=1 - 0.45 / height,
                        hspace=0.5, wspace=0.3)
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
    ax.legend(fontsize=8)
    ax.set_title(f"{result['method']} (energy {result['energy']}): rank per layer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_accuracy_flops(results: list[dict], path: str,
                        reference: tuple[str, float] | None = None) -> None:
    """Test accuracy against deployed FLOPs per sample (fraction of dense), one line per
    method, points labelled by energy threshold; `reference` (label, accuracy) as a line.
    Points far below the best accuracy are drawn on the axis floor, labelled with it."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    accs = [r["accuracy"] for r in results] + ([reference[1]] if reference else [])
    # the y axis shows at most 25 points below the best; lower points sit on the floor
    floor = max(min(accs) - 1, max(accs) - 25)
    for method in dict.fromkeys(r["method"] for r in results):
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["deployed_flops"])
        xs = [r["deployed_flops"] / r["dense_flops"] for r in rows]
        ys = [max(r["accuracy"], floor) for r in rows]
        ax.plot(xs, ys, marker="o", color=COLORS.get(method), label=method)
        for x, y, r in zip(xs, ys, rows):
            label = f"{r['energy']:g}" + (f" ({r['accuracy']:.0f}%)" if r["accuracy"] < floor else "")
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_ylim(floor - 0.5, max(accs) + 1)
    if reference is not None:
        ax.axhline(reference[1], color="black", ls=":", label=reference[0])
    ax.set_xlabel("FLOPs per sample / dense FLOPs (deployed, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
