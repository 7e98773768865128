"""`svdkern compare`: the methods side by side as a compression study would run them.

- Equal budgets: every method and the dense model run the same batch size and epochs, so
  the same number of optimizer steps (each result records `steps`).
- Tuned on validation: each method's learning rate (the default times each of
  `lr_factors`) and its operating point (an energy threshold) are chosen on a validation
  split carved from the training data (`Dataset.holdout`), never on the test split. The
  operating point is the energy with the fewest FLOPs (`Study.cost`: deployed, or the SVD
  form's) whose validation score is within `tolerance` of the dense model's (accuracy:
  points below; perplexity: percent above); if none is, the best-scoring energy, flagged
  (`within_tolerance` False). The learning rate is the one whose operating point ranks
  first by the same rule (`rank_key`).
- Reported on test over seeds: with the chosen learning rates, every method runs on the
  whole training data for each seed and is scored on the test split; the table gives the
  mean and standard deviation over seeds at every energy, the chosen ones marked.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

from .data import Dataset
from .pipeline import TrainConfig, dense_baseline, run_method


@dataclass(frozen=True)
class Study:
    """What `compare` runs: energies, seeds and the tuning on validation."""

    energies: tuple[float, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    lr_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    val_fraction: float = 0.2  # 0: no tuning, every method at its default learning rate
    tolerance: float = 1.0  # accuracy points below dense, or perplexity percent above
    cost: str = "deployed_flops"  # or "flops": the SVD form's, matrices merged on export too


def equal_steps(configs: dict[str, TrainConfig]) -> dict[str, TrainConfig]:
    """The configs with one batch size for all (the one given, else SVD training's default
    for the data set) and so, at the same epochs, the same number of optimizer steps."""
    batch = next(iter(configs.values())).batch_size
    if batch is None:
        batch = replace(next(iter(configs.values())), method="svd").resolved().batch_size
    return {m: replace(c, batch_size=batch) for m, c in configs.items()}


def within(metric: str, score: float, dense: float, tolerance: float) -> bool:
    """Whether `score` is within `tolerance` of the dense model's."""
    if metric == "accuracy":
        return score >= dense - tolerance
    return score <= dense * (1 + tolerance / 100)


def rank_key(r: dict, dense: float, study: Study) -> tuple:
    """Sort key of candidate results, best first: those within tolerance of dense by fewest
    FLOPs (`study.cost`) then best score; after them the others by best score."""
    if within(r["metric"], r[r["metric"]], dense, study.tolerance):
        return (0, r[study.cost], -_signed(r))
    return (1, -_signed(r), r[study.cost])


def _signed(r: dict) -> float:
    """The score, larger is better; a diverged run (NaN, infinite perplexity) is worst."""
    score = r[r["metric"]] if r["metric"] == "accuracy" else -r[r["metric"]]
    return score if math.isfinite(score) else -math.inf


def _dense_config(configs: dict[str, TrainConfig]) -> TrainConfig:
    """The dense model's config: truncation's (its dense phase), else any method's settings."""
    return replace(configs.get("truncate", next(iter(configs.values()))), method="truncate")


def tune(configs: dict[str, TrainConfig], data: Dataset, study: Study,
         progress: bool = False) -> dict:
    """Learning rate and operating point per method (and the dense model's learning rate),
    each chosen on the validation split: a dict with every candidate's validation result."""
    val = data.holdout(study.val_fraction)
    configs = {m: replace(c, seed=study.seeds[0]) for m, c in configs.items()}
    metric = val.metric
    dense_cfg = _dense_config(configs)
    dense_runs = []
    for factor in study.lr_factors:
        cfg = replace(dense_cfg, lr=factor * dense_cfg.resolved().lr)
        dense_runs.append(dense_baseline(cfg, val, progress))
    dense = max(dense_runs, key=_signed)
    chosen, candidates = {"dense": {"lr": dense["lr"], f"val_{metric}": dense[metric]}}, []
    for method, base in configs.items():
        results = [r for factor in study.lr_factors
                   for r in run_method(replace(base, lr=factor * base.resolved().lr), val,
                                       list(study.energies), progress)]
        candidates += [_brief(r, study.cost) for r in results]
        # the best operating point over every learning rate
        best = min(results, key=lambda r: rank_key(r, dense[metric], study))
        chosen[method] = {"lr": best["config"]["lr"], "energy": best["energy"],
                          f"val_{metric}": best[metric],
                          "val_flops_ratio": best[study.cost] / best["dense_flops"],
                          "within_tolerance": within(metric, best[metric], dense[metric],
                                                     study.tolerance)}
    return {"chosen": chosen, "dense_candidates": [
        {"lr": r["lr"], f"val_{metric}": r[metric]} for r in dense_runs],
        "candidates": candidates}


def _brief(r: dict, cost: str) -> dict:
    return {"method": r["method"], "lr": r["config"]["lr"], "energy": r["energy"],
            f"val_{r['metric']}": r[r["metric"]],
            "flops_ratio": r[cost] / r["dense_flops"], "steps": r["steps"]}


def run_study(configs: dict[str, TrainConfig], data: Dataset, study: Study,
              progress: bool = False) -> dict:
    """Tune (unless `val_fraction` is 0), then run every method and the dense model for each
    seed on the whole training data, scored on the test split."""
    configs = equal_steps(configs)
    tuning = tune(configs, data, study, progress) if study.val_fraction else None
    lr = {m: tuning["chosen"][m]["lr"] for m in ("dense", *configs)} if tuning else {}
    dense_cfg = _dense_config(configs)
    dense, results = [], []
    for seed in study.seeds:
        dense.append(dense_baseline(replace(dense_cfg, seed=seed, lr=lr.get("dense", dense_cfg.lr)),
                                    data, progress))
        for method, cfg in configs.items():
            results += run_method(replace(cfg, seed=seed, lr=lr.get(method, cfg.lr)), data,
                                  list(study.energies), progress)
    return {"tuning": tuning, "dense_runs": dense, "results": results,
            "rows": aggregate(results, dense, tuning, study.cost)}


def aggregate(results: list[dict], dense: list[dict], tuning: dict | None,
              cost: str = "deployed_flops") -> list[dict]:
    """Mean and standard deviation over seeds per (method, energy), dense first; `chosen`
    marks each method's operating point from the tuning."""
    metric = dense[0]["metric"]
    rows = [_row("dense", None, dense, metric, cost)]
    keys = list(dict.fromkeys((r["method"], r["energy"]) for r in results))
    for method, energy in keys:
        runs = [r for r in results if r["method"] == method and r["energy"] == energy]
        pick = tuning["chosen"][method] if tuning else None
        chosen = pick is not None and pick["energy"] == energy
        rows.append(_row(method, energy, runs, metric, cost, chosen,
                         chosen and pick["within_tolerance"]))
    return rows


def _row(method: str, energy: float | None, runs: list[dict], metric: str, cost: str,
         chosen: bool = False, within_tolerance: bool = False) -> dict:
    scores = [r[metric] for r in runs]
    ratios = [r[cost] / _dense_flops(r) for r in runs]
    return {"method": method, "energy": energy, "threshold": runs[0].get("threshold"),
            "within_tolerance": within_tolerance,
            "chosen": chosen, "seeds": len(runs), "metric": metric, "unit": runs[0]["unit"],
            "cost": cost,
            "lr": runs[0]["config"]["lr"] if "config" in runs[0] else runs[0]["lr"],
            "steps": runs[0]["steps"], f"{metric}_mean": statistics.fmean(scores),
            f"{metric}_std": _sd(scores),
            "flops_ratio_mean": statistics.fmean(ratios), "flops_ratio_std": _sd(ratios),
            "deployed_ratio_mean": statistics.fmean(r["deployed_flops"] / _dense_flops(r)
                                                    for r in runs),
            "deployed_flops_mean": statistics.fmean(r["deployed_flops"] for r in runs),
            "deployed_params_mean": statistics.fmean(r["deployed_params"] for r in runs),
            "factored_flops_mean": statistics.fmean(r["flops"] for r in runs)}


def _dense_flops(r: dict) -> int:
    """The dense cost of a result (a dense model's own FLOPs are its dense cost)."""
    return r.get("dense_flops", r["flops"])


def _sd(values: list[float]) -> float:
    """The sample standard deviation; 0 for one value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0
