"""`save` / `load`: checkpoints of SVD models at any rank, read without executing code."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..layers import svd_layers

FORMAT = "svdkern-checkpoint"
VERSION = 1


def save(model: nn.Module, path: str | os.PathLike, extra: dict | None = None, *,
         optimizer: torch.optim.Optimizer | None = None, regularizer=None,
         rng: bool = False) -> None:
    """Write `model`'s state_dict (ranks are implied by the shapes of `s`) and optional
    tensors/plain data in `extra`. For resuming training also pass `optimizer` (its state
    follows the pruned ranks), `regularizer` (an `SVDRegularizer`: its settings) and
    `rng=True` (torch's CPU and CUDA generator states, for dropout and data sampling)."""
    payload = {"format": FORMAT, "version": VERSION,
               "state_dict": model.state_dict(), "extra": extra or {},
               "optimizer": None if optimizer is None else optimizer.state_dict(),
               "optimizer_type": None if optimizer is None else type(optimizer).__name__,
               "regularizer": None if regularizer is None else regularizer_settings(regularizer),
               "rng": rng_state() if rng else None}
    torch.save(payload, path)


def load(model: nn.Module, path: str | os.PathLike, map_location="cpu", *,
         optimizer: torch.optim.Optimizer | None = None, regularizer=None,
         restore_rng: bool = False) -> dict:
    """Load a checkpoint written by `save` into `model` (same architecture, any ranks),
    resizing its SVD layers to the saved ranks; returns the checkpoint's `extra`.
    `optimizer`, `regularizer` and `restore_rng=True` restore what `save` stored for them
    (each must be in the file), so training continues bit-identically on CPU.

    The file is read with `weights_only=True` (no code runs). Every key and shape (the
    optimizer's state included) is checked before anything is changed, so a truncated or
    mismatched file leaves `model`, `optimizer` and `regularizer` untouched.
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated, corrupt, or not a torch file
        raise ValueError(f"load: cannot read checkpoint {os.fspath(path)!r}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"load: {os.fspath(path)!r} is not an svdkern checkpoint")
    state = payload["state_dict"]
    check_compatible(model, state)
    wanted = {"optimizer": optimizer is not None, "regularizer": regularizer is not None,
              "rng": restore_rng}
    missing = [key for key, want in wanted.items() if want and payload.get(key) is None]
    if missing:
        raise ValueError(f"load: {os.fspath(path)!r} holds no {' / '.join(missing)} state "
                         "(save it with save(..., optimizer=..., regularizer=..., rng=True))")
    if optimizer is not None:
        check_optimizer_compatible(model, state, optimizer, payload["optimizer"],
                                   payload.get("optimizer_type"))
    if regularizer is not None:
        type(regularizer).check_settings(**payload["regularizer"])
    if restore_rng:
        check_rng_state(payload["rng"])
    model.load_state_dict(state, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if regularizer is not None:
        for key, value in payload["regularizer"].items():
            setattr(regularizer, key, value)
    if restore_rng:
        set_rng_state(payload["rng"])
    return payload.get("extra", {})


def regularizer_settings(regularizer) -> dict:
    """The constructor arguments of an `SVDRegularizer`, other than its model."""
    return {"ortho": regularizer.ortho, "sparsity": regularizer.sparsity,
            "strength": regularizer.strength}


def rng_state() -> dict:
    """torch's generator states: CPU, and every CUDA device when CUDA is up."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def check_rng_state(rng: dict) -> None:
    if not (isinstance(rng, dict) and isinstance(rng.get("cpu"), torch.Tensor)
            and rng["cpu"].dtype == torch.uint8):
        raise ValueError("load: the checkpoint's RNG state is malformed")
    if rng["cuda"] and len(rng["cuda"]) != torch.cuda.device_count():
        raise ValueError(f"load: the checkpoint holds {len(rng['cuda'])} CUDA RNG states but "
                         f"{torch.cuda.device_count()} CUDA devices are visible")


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


def check_optimizer_compatible(model: nn.Module, state: dict, optimizer: torch.optim.Optimizer,
                               saved: dict, saved_type: str) -> None:
    """Raise a ValueError unless `saved` (an optimizer state_dict) fits `optimizer` once
    `model` holds `state`: same optimizer type, groups and parameter counts, and every
    per-parameter state
    tensor (Adam moments, momentum) of the shape the parameter will have."""
    if saved_type != type(optimizer).__name__:
        raise ValueError(f"load: the checkpoint holds {saved_type} state, not "
                         f"{type(optimizer).__name__} state")
    groups = optimizer.param_groups
    sizes = [len(g["params"]) for g in groups]
    saved_sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != saved_sizes:
        raise ValueError(f"load: optimizer has parameter groups of sizes {sizes}, the "
                         f"checkpoint's has {saved_sizes}")
    names = {id(p): n for n, p in model.named_parameters()}
    problems = []
    for group, saved_group in zip(groups, saved["param_groups"]):
        for param, index in zip(group["params"], saved_group["params"]):
            name = names.get(id(param))
            shape = tuple(state[name].shape) if name in state else tuple(param.shape)
            for key, value in saved["state"].get(index, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and tuple(value.shape) != shape:
                    problems.append(f"{name or f'parameter {index}'}: optimizer state {key!r} "
                                    f"shape {tuple(value.shape)} != parameter shape {shape}")
    if problems:
        raise ValueError("load: optimizer state does not fit the model: " + "; ".join(problems))


def check_compatible(model: nn.Module, state: dict) -> None:
    """Raise a ValueError naming every key that is missing, unexpected, or of a shape the
    model cannot take (SVD layers accept any consistent rank)."""
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    flexible = set()
    for name, layer in svd_layers(model):
        prefix = f"{name}." if name else ""
        keys = [prefix + k for k in ("U", "s", "V")]
        if all(k in state for k in keys):
            flexible.update(keys)
            if not layer._consistent_shapes(*(state[k] for k in keys)):
                problems.append(f"{name or 'model'}: factor shapes "
                                f"{[tuple(state[k].shape) for k in keys]} do not fit the layer")
    for key, value in state.items():
        if key in own and key not in flexible and tuple(value.shape) != tuple(own[key].shape):
            problems.append(f"{key}: shape {tuple(value.shape)} != model's {tuple(own[key].shape)}")
    if problems:
        raise ValueError("load: checkpoint does not fit the model: " + "; ".join(problems))
