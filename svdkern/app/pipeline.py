"""The three compression methods of the training CLI, run on the same data and budget:

- "svd": SVD training (docs/SPEC.md section 1): train in SVD form with the orthogonality term
  (alone for the first `sparsity_start` epochs, the paper's stage 1), then with the
  sparsity term added, prune by the energy rule, fine-tune with sparsity off, ortho kept;
- "trp": TRP (docs/SPEC.md section 2): dense training with the nuclear subgradient and periodic
  truncation, exported at the last truncation's ranks, no fine-tuning;
- "truncate": post-hoc baseline: train dense, truncate each layer's SVD by the energy rule,
  fine-tune.

Every method trains `epochs` epochs in all (svd and truncate: `epochs - finetune_epochs`
then `finetune_epochs` of fine-tuning). Each phase (training, fine-tuning) runs the paper's
step schedule from the base learning rate: x0.1 at 50% and 75% of its epochs. Several
energy thresholds share the training that does not depend on the threshold (svd and
truncate up to pruning).
"""
from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..compress.decompose import decompose
from ..compress.export import merged_on_export
from ..compress.pruning import prune
from ..compress.summary import summary
from ..layers import svd_layers
from ..methods.svd_training import SVDTraining
from ..methods.trp import TRP
from ..reference import check_energy, check_prune_rule, check_rank_multiple
from .data import Dataset, batches
from .models import build_model

METHODS = ("svd", "trp", "truncate")


@dataclass(frozen=True)
class DataDefaults:
    """A data set's default schedule for SVD training and truncation (Adam)."""

    epochs: int
    batch_size: int
    lr: float
    scheme: str
    energy: float


# CIFAR-10: the paper's. Digits (1,437 training images, the main job's quick CPU run):
# about 3,600 steps at lr 3e-3, the fewest measured to reach 8x fewer deployed FLOPs
# within a point of dense (README, "Training CLI"). Text: the character LSTM, 2,160 steps,
# so its whole study (README, "The LSTM experiment") fits in an hour on 2 cores.
DATA_DEFAULTS = {"digits": DataDefaults(80, 32, 3e-3, "spatial", 0.002),
                 "cifar10": DataDefaults(164, 100, 1e-3, "channel", 0.01),
                 "text": DataDefaults(12, 32, 3e-3, "channel", 0.01)}
# official ResNet-20 channel-wise strengths (Hoyer-Square: `Start up code.md`, decay 1e-2)
SPARSITY_STRENGTH = {"hoyer": 0.07, "hoyer_square": 0.01, "l1": 0.3}


@dataclass
class TrainConfig:
    """Every knob of a run; None means the method's (or data set's) default, see `resolved`."""

    method: str = "svd"
    model: str = "cnn"
    data: str = "digits"
    data_dir: str | None = None
    epochs: int | None = None
    finetune_epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    lambda_o: float = 1.0
    lambda_s: float | None = None
    sparsity: str = "hoyer"
    sparsity_start: int = 0
    energy: float | None = None
    threshold: float | None = None  # prune by value (|s_j| >= threshold) instead of energy
    rank_multiple: int = 1
    scheme: str | None = None
    nuclear: float = 3e-4
    trp_period: int = 5
    trp_schedule: str = "official"
    trp_scope: str = "all"
    seed: int = 0
    device: str = "cpu"

    def resolved(self) -> "TrainConfig":
        """Fill the defaults: SVD training and truncation use Adam at the data set's
        `DATA_DEFAULTS` (on CIFAR-10 the paper's: lr 1e-3, batch 100, 164 epochs), a
        quarter of the epochs fine-tuning; TRP on images its official SGD (lr 0.1, momentum
        0.9, weight decay 1e-4, batch 128), on text Adam as the others (TRP's code has no
        language-model recipe)."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.sparsity not in SPARSITY_STRENGTH:
            raise ValueError(f"unknown sparsity {self.sparsity!r}; expected one of "
                             f"{', '.join(SPARSITY_STRENGTH)}")
        if self.data not in DATA_DEFAULTS:
            raise ValueError(f"unknown data set {self.data!r}; expected one of "
                             f"{', '.join(DATA_DEFAULTS)}")
        defaults = DATA_DEFAULTS[self.data]
        energy = self.energy if self.energy is not None else defaults.energy
        check_energy(self.method, energy)
        if self.threshold is not None:
            check_prune_rule(self.method, None, self.threshold)
            if self.method == "trp":
                raise ValueError("threshold: TRP truncates by the energy rule (official "
                                 "EnergyThreshold); use --energy")
        check_rank_multiple(self.method, self.rank_multiple)
        for name, ok, bound in _BOUNDS:
            value = getattr(self, name)
            if value is not None and not ((isinstance(value, int) or math.isfinite(value))
                                          and ok(value)):
                raise ValueError(f"{self.method}: {name} must be finite and {bound}, got {value}")
        sgd = self.method == "trp" and self.data != "text"
        optimizer = self.optimizer or ("sgd" if sgd else "adam")
        epochs = self.epochs if self.epochs is not None else defaults.epochs
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        ft = self.finetune_epochs if self.finetune_epochs is not None else epochs // 4
        if not 0 <= ft < epochs:
            raise ValueError(f"finetune_epochs must be in [0, epochs), got {ft} of {epochs}")
        if not 0 <= self.sparsity_start <= epochs - ft:
            raise ValueError(f"sparsity_start must be in [0, {epochs - ft}] (the epochs before "
                             f"pruning), got {self.sparsity_start}")
        return replace(
            self, epochs=epochs, finetune_epochs=ft, energy=energy,
            scheme=self.scheme or defaults.scheme,
            batch_size=self.batch_size if self.batch_size is not None else (
                128 if sgd else defaults.batch_size),
            optimizer=optimizer,
            lr=self.lr if self.lr is not None else (
                0.1 if optimizer == "sgd" else defaults.lr),
            weight_decay=self.weight_decay if self.weight_decay is not None else (1e-4 if sgd else 0.0),
            lambda_s=self.lambda_s if self.lambda_s is not None else SPARSITY_STRENGTH[self.sparsity])


# Settings with a valid range (None: the method's default), checked by `resolved`.
_BOUNDS = (("batch_size", lambda v: v >= 1, ">= 1"), ("lr", lambda v: v > 0, "> 0"),
           ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
           ("weight_decay", lambda v: v >= 0, ">= 0"), ("lambda_o", lambda v: v >= 0, ">= 0"),
           ("lambda_s", lambda v: v >= 0, ">= 0"), ("nuclear", lambda v: v >= 0, ">= 0"),
           ("trp_period", lambda v: v >= 1, ">= 1"))


class Run:
    """One training run's state: model, optimizer, data order, learning-rate schedule."""

    def __init__(self, cfg: TrainConfig, data: Dataset, model: nn.Module, progress: bool) -> None:
        self.cfg, self.data, self.model = cfg, data, model.to(cfg.device)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.optimizer = make_optimizer(cfg, model)
        self.history: list[dict] = []
        self.steps = 0  # optimizer steps taken, over every phase
        self.progress = progress

    def rebuild_optimizer(self) -> None:
        """A fresh optimizer after the parameters changed (post-hoc truncation)."""
        self.optimizer = make_optimizer(self.cfg, self.model)

    def lr_at(self, epoch: int, phase: range) -> float:
        """Step schedule within a phase: x0.1 at 50% and 75% of its epochs (never in its
        first epoch, so a 1-epoch phase runs at the base rate)."""
        done = epoch - phase.start
        return self.cfg.lr * 0.1 ** sum(done >= max(1, int(f * len(phase))) for f in (0.5, 0.75))

    def train(self, epochs: range, label: str, penalty: Callable[[], Tensor] | None = None,
              after_backward: Callable[[], None] | None = None,
              after_step: Callable[[], object] | None = None,
              on_epoch: Callable[[int], None] | None = None) -> None:
        """Train over `epochs` (absolute epoch numbers), one phase of the schedule."""
        from tqdm.auto import tqdm

        bar = tqdm(epochs, desc=label, leave=False, disable=not self.progress, file=sys.stderr)
        for epoch in bar:
            if on_epoch is not None:
                on_epoch(epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(epoch, epochs)
            self.model.train()
            total = count = 0.0
            for x, y in batches(self.data.train_x, self.data.train_y, self.cfg.batch_size,
                                self.gen, self.data.augment, self.data.black):
                x, y = x.to(self.cfg.device), y.to(self.cfg.device)
                loss = task_loss(self.model(x), y)
                total += float(loss.detach()) * len(y)
                count += len(y)
                if penalty is not None:
                    loss = loss + penalty()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if after_backward is not None:
                    after_backward()
                self.optimizer.step()
                self.steps += 1
                if after_step is not None:
                    after_step()
            score = evaluate(self.model, self.data, self.cfg.device)
            self.history.append({"epoch": epoch, "phase": label, "loss": total / count,
                                 f"test_{self.data.metric}": score})
            bar.set_postfix(loss=f"{total / count:.3f}", test=f"{score:.2f}")

    def fork(self) -> "Run":
        """An independent copy (model and data order) to branch from, with a fresh
        optimizer: every branch starts a stage (the paper's fine-tuning, truncation's)."""
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        other.optimizer = make_optimizer(self.cfg, other.model)
        other.gen = torch.Generator().manual_seed(0)
        other.gen.set_state(self.gen.get_state())
        other.history = list(self.history)
        return other


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected adam or sgd")


def task_loss(out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of class logits (N, C) against labels (N,), or of next-token logits
    (N, T, V) against the next tokens (N, T)."""
    return F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, device: str) -> float:
    """The test split's `data.metric`: accuracy in percent, or (text) perplexity per token,
    exp of the mean cross-entropy over every test token."""
    model.eval()
    hits = 0.0
    for x, y in batches(data.test_x, data.test_y, 500):
        out, y = model(x.to(device)), y.to(device)
        hits += float(task_loss(out, y, "sum") if data.kind == "text" else
                      (out.argmax(1) == y).sum())
    if data.kind == "text":  # a diverged model's mean cross-entropy overflows exp: inf
        mean = hits / data.test_y.numel()
        return math.exp(mean) if mean < 700 else math.inf
    return 100.0 * hits / len(data.test_y)


def spectra(model: nn.Module) -> dict[str, list[float]]:
    """Singular values of every SVD layer (all groups, descending)."""
    return {name: sorted(layer.s.detach().flatten().double().tolist(), reverse=True)
            for name, layer in svd_layers(model)}


def dense_spectra(model: nn.Module, scheme: str) -> dict[str, list[float]]:
    """Singular values of a dense model's layers, via its exact SVD form."""
    return spectra(decompose(copy.deepcopy(model).cpu(), scheme))


def costs(model: nn.Module, data: Dataset) -> dict:
    """Parameters and FLOPs per sample of an SVD model: svdkern.summary's totals, and the
    deployed cost as svdkern.export ships it: a layer not worth factorizing
    (r (m+n) >= m n), or merged on export (attention, RNNs), counts dense, the others as two
    thin layers with `s` folded in."""
    example = data.test_x[:1].to(next(model.parameters()).device)
    table = summary(model, example, verbose=False)
    layers = [dict(svd_layers(model))[row.name] for row in table.layers]
    merged = merged_on_export(model)
    keep = [layer.worth_factorizing() and row.name not in merged
            for row, layer in zip(table.layers, layers)]
    return {
        "table": str(table),
        "summary": table.to_dict(),
        "params": table.params, "dense_params": table.dense_params,
        "flops": table.flops, "dense_flops": table.dense_flops,
        "deployed_params": sum(layer.lowrank_params() if k else r.dense_params
                               for r, layer, k in zip(table.layers, layers, keep)),
        "deployed_flops": sum(r.flops if k else r.dense_flops for r, k in zip(table.layers, keep)),
        "ranks": {r.name: [r.rank, r.full_rank] for r in table.layers},
    }


def run_method(cfg: TrainConfig, data: Dataset, energies: list[float] | None = None,
               progress: bool = False) -> list[dict]:
    """Run `cfg.method` and return one result dict per energy threshold (default: cfg.energy;
    with `cfg.threshold`, one result pruned by that value threshold, energy None)."""
    cfg = cfg.resolved()
    energies = [None] if cfg.threshold is not None else (
        list(energies) if energies else [cfg.energy])
    runner = {"svd": _run_svd, "trp": _run_trp, "truncate": _run_truncate}[cfg.method]
    return runner(cfg, data, energies, progress)


def rule_label(threshold: float | None, energy: float | None) -> str:
    """"threshold=0.1" or "energy=0.01": the pruning rule of a run."""
    return f"threshold={threshold:g}" if threshold is not None else f"energy={energy:g}"


def _fresh_model(cfg: TrainConfig, data: Dataset) -> nn.Module:
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, data.input_shape, data.num_classes)


def _result(cfg: TrainConfig, energy: float, run: Run, final: nn.Module, before: float,
            spec_init: dict, spec_before: dict, seconds: float, extra: dict | None = None) -> dict:
    """One run's numbers; its score (accuracy or perplexity, `metric`) under that name, the
    score before pruning as `<metric>_before`."""
    metric = run.data.metric
    return {"method": cfg.method, "energy": energy, "threshold": cfg.threshold,
            "config": asdict(replace(cfg, energy=cfg.energy if energy is None else energy)),
            "metric": metric, "unit": run.data.unit,
            metric: evaluate(final, run.data, cfg.device), f"{metric}_before": before,
            "steps": run.steps, **costs(final, run.data),
            "spectra": {"init": spec_init, "before": spec_before, "after": spectra(final)},
            "history": run.history, "seconds": seconds, **(extra or {})}


def _run_svd(cfg: TrainConfig, data: Dataset, energies: list[float], progress: bool) -> list[dict]:
    """The paper's stages (official `Start up code.md`), each with a fresh optimizer and
    its own schedule: orthogonality only (`sparsity_start` epochs), then with the sparsity
    term, then per energy: prune, fine-tune with sparsity off (ortho kept)."""
    t0 = time.perf_counter()
    model = decompose(_fresh_model(cfg, data), cfg.scheme)
    spec_init = spectra(model)
    run = Run(cfg, data, model, progress)
    prune_at = cfg.epochs - cfg.finetune_epochs
    hook = SVDTraining(run.model, cfg.lambda_o, cfg.sparsity, cfg.lambda_s, cfg.energy,
                       sparsity_start=cfg.sparsity_start, rank_multiple=cfg.rank_multiple)
    if cfg.sparsity_start:
        run.train(range(cfg.sparsity_start), "svd stage 1 (orthogonality)",
                  penalty=hook.penalty, on_epoch=hook.on_epoch_start)
        run.rebuild_optimizer()
    run.train(range(cfg.sparsity_start, prune_at), "svd stage 2 (sparsity)",
              penalty=hook.penalty, on_epoch=hook.on_epoch_start)
    before, spec_before = evaluate(run.model, data, cfg.device), spectra(run.model)
    shared = time.perf_counter() - t0
    results = []
    for energy in energies:
        t1 = time.perf_counter()
        branch = run.fork()
        hook = SVDTraining(branch.model, cfg.lambda_o, cfg.sparsity, cfg.lambda_s, energy,
                           rank_multiple=cfg.rank_multiple, threshold=cfg.threshold)
        hook.prune_now()  # the branch's fresh optimizer has no state to slice yet
        if cfg.finetune_epochs:
            branch.train(range(prune_at, cfg.epochs),
                         f"svd finetune {rule_label(cfg.threshold, energy)}", penalty=hook.penalty)
        results.append(_result(cfg, energy, branch, branch.model, before, spec_init,
                               spec_before, shared + time.perf_counter() - t1))
    return results


def _run_truncate(cfg: TrainConfig, data: Dataset, energies: list[float], progress: bool) -> list[dict]:
    t0 = time.perf_counter()
    run = Run(cfg, data, _fresh_model(cfg, data), progress)
    spec_init = dense_spectra(run.model, cfg.scheme)
    prune_at = cfg.epochs - cfg.finetune_epochs
    run.train(range(prune_at), "dense train")
    before = evaluate(run.model, data, cfg.device)
    shared = time.perf_counter() - t0
    results = []
    for energy in energies:
        t1 = time.perf_counter()
        branch = run.fork()
        decompose(branch.model, cfg.scheme)
        spec_before = spectra(branch.model)
        prune(branch.model, energy, rank_multiple=cfg.rank_multiple, threshold=cfg.threshold)
        truncated = evaluate(branch.model, data, cfg.device)
        branch.rebuild_optimizer()
        if cfg.finetune_epochs:
            branch.train(range(prune_at, cfg.epochs),
                         f"truncate finetune {rule_label(cfg.threshold, energy)}")
        results.append(_result(cfg, energy, branch, branch.model, before, spec_init,
                               spec_before, shared + time.perf_counter() - t1,
                               {f"{data.metric}_truncated": truncated}))
    return results


def _run_trp(cfg: TrainConfig, data: Dataset, energies: list[float], progress: bool) -> list[dict]:
    results = []
    for energy in energies:
        t0 = time.perf_counter()
        run = Run(cfg, data, _fresh_model(cfg, data), progress)
        spec_init = dense_spectra(run.model, cfg.scheme)
        trp = make_trp(replace(cfg, energy=energy), run.model)
        run.train(range(cfg.epochs), f"trp e={energy}", after_backward=trp.after_backward,
                  after_step=trp.after_step)
        before = evaluate(run.model, data, cfg.device)
        spec_before = dense_spectra(run.model, cfg.scheme)
        final = trp.to_svd()
        results.append(_result(cfg, energy, run, final, before, spec_init, spec_before,
                               time.perf_counter() - t0))
    return results


def make_trp(cfg: TrainConfig, model: nn.Module) -> TRP:
    """TRP on `model` with the run's settings (built: truncates before the first step)."""
    return TRP(model, cfg.energy, cfg.nuclear, cfg.trp_period, cfg.scheme,
               rank_multiple=cfg.rank_multiple, schedule=cfg.trp_schedule, scope=cfg.trp_scope)


def check_trp(cfg: TrainConfig, data: Dataset) -> None:
    """TRP's ValueError, if any, for this run's model (a layer it refuses, a scope that
    keeps nothing), before any training."""
    make_trp(cfg, _fresh_model(cfg, data))


def dense_baseline(cfg: TrainConfig, data: Dataset, progress: bool = False) -> dict:
    """The uncompressed reference: the dense model trained for all epochs (truncation's
    optimizer), with its score (accuracy or perplexity, `metric`) and dense cost."""
    cfg = replace(cfg, method="truncate").resolved()
    run = Run(cfg, data, _fresh_model(cfg, data), progress)
    run.train(range(cfg.epochs), "dense")
    with warnings.catch_warnings():  # a copy, only to count FLOPs
        warnings.simplefilter("ignore", UserWarning)
        svd_form = decompose(copy.deepcopy(run.model), cfg.scheme)
    c = costs(svd_form, data)
    return {"method": "dense", "metric": data.metric, "unit": data.unit,
            data.metric: evaluate(run.model, data, cfg.device), "lr": cfg.lr,
            "steps": run.steps, "params": c["dense_params"], "flops": c["dense_flops"],
            "deployed_params": c["dense_params"], "deployed_flops": c["dense_flops"]}
