"""`save` / `load`: checkpoints of SVD models at any rank, read without executing code."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from .layers import svd_layers

FORMAT = "svdkern-checkpoint"
VERSION = 1


def save(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write `model`'s state_dict (ranks are implied by the shapes of `s`) and optional
    tensors/plain data in `extra` (e.g. an optimizer's state_dict)."""
    payload = {"format": FORMAT, "version": VERSION,
               "ranks": {name: layer.rank for name, layer in svd_layers(model)},
               "state_dict": model.state_dict(), "extra": extra or {}}
    torch.save(payload, path)


def load(model: nn.Module, path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by `save` into `model` (same architecture, any ranks),
    resizing its SVD layers to the saved ranks; returns the checkpoint's `extra`.

    The file is read with `weights_only=True` (no code runs). Every key and shape is checked
    before anything is copied, so a truncated or mismatched file leaves `model` untouched.
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
    model.load_state_dict(state, strict=True)
    return payload.get("extra", {})


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
