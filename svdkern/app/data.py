"""Data sets of the training CLI, held as in-memory tensors: scikit-learn's bundled digits
(no download), CIFAR-10 read from its standard python batches with a restricted
unpickler, so a tampered file cannot execute code, and a character-level text corpus of
standard-library source files read from the running interpreter (no download either)."""
from __future__ import annotations

import io
import os
import pickle
import sysconfig
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

DATASETS = ("digits", "cifar10", "text")
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# The text corpus: these standard-library modules, present as source in every CPython
# since 3.8; the first 90% of each file's characters train, the last 10% test.
TEXT_FILES = ("argparse.py", "bisect.py", "calendar.py", "copy.py", "csv.py", "difflib.py",
              "fnmatch.py", "fractions.py", "glob.py", "heapq.py", "pprint.py", "queue.py",
              "shlex.py", "string.py", "textwrap.py", "tokenize.py")
TEXT_VOCAB = 128  # ASCII; every non-ASCII byte reads as token 127
TEXT_CONTEXT = 64  # characters per training sequence
TEXT_BLOCK = 100  # sequences per block of the text validation split (6,400 characters)


@dataclass
class Dataset:
    """Train/test tensors. Images: (N, C, H, W) float32 and labels (N,) int64, scored by
    accuracy. Text: token sequences (N, T) int64 and the next token of each position
    (N, T), scored by perplexity per token."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int  # classes, or the vocabulary size of text
    augment: bool = False
    black: tuple[float, ...] | None = None  # a black pixel after normalization: crop padding
    kind: str = "image"  # or "text"

    @property
    def metric(self) -> str:
        """What `pipeline.evaluate` reports: "accuracy" (percent) or "perplexity"."""
        return "perplexity" if self.kind == "text" else "accuracy"

    @property
    def unit(self) -> str:
        """What one FLOP count is for: a sample (an image) or a token of text."""
        return "token" if self.kind == "text" else "sample"

    def head(self, n: int) -> "Dataset":
        """The first `n` training samples only (quick checks); the test set is kept whole."""
        if n < 1:
            raise ValueError(f"need at least one training sample, got {n}")
        return replace(self, train_x=self.train_x[:n], train_y=self.train_y[:n])

    def holdout(self, fraction: float) -> "Dataset":
        """A validation split carved from the training data: the returned Dataset trains
        on the rest and tests on the held-out part, so settings tuned on it never see the
        test split. The same split for every run: a fixed shuffle for images; for text the
        last `fraction` of every block of `TEXT_BLOCK` consecutive sequences, so the
        held-out text is spread over the files (all but those shorter than a block's
        tail), as the test split is, and few held-out sequences border training ones."""
        n = len(self.train_y)
        held = round(fraction * n)
        if not 0 < held < n:
            raise ValueError(f"validation fraction {fraction} of {n} training samples leaves "
                             "no validation or no training sample")
        if self.kind == "text":
            tail = torch.arange(n) % TEXT_BLOCK >= TEXT_BLOCK - round(fraction * TEXT_BLOCK)
            if n < TEXT_BLOCK or tail.all() or not tail.any():
                tail = torch.arange(n) >= n - held  # shorter than a block: its tail
            rest, val = torch.nonzero(~tail).flatten(), torch.nonzero(tail).flatten()
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
            rest, val = order[:n - held], order[n - held:]
        return replace(self, name=f"{self.name} (validation split)",
                       train_x=self.train_x[rest], train_y=self.train_y[rest],
                       test_x=self.train_x[val], test_y=self.train_y[val])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    if name == "digits":
        return load_digits()
    if name == "text":
        return load_text()
    if name == "cifar10":
        if not data_dir:
            raise ValueError("--data cifar10 needs --data-dir DIR (the folder holding "
                             "data_batch_1..5 and test_batch of the CIFAR-10 python version)")
        return load_cifar10(data_dir)
    raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 1797 8x8 digits as 1x8x8 images in [0, 1], a fixed stratified split
    (the same for every run and method, whatever the training seed)."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction,
                                              random_state=split_seed, stratify=y)
    return Dataset("digits", *map(torch.from_numpy, (x_tr, y_tr, x_te, y_te)), num_classes=10)


def load_text(files: tuple[str, ...] = TEXT_FILES, context: int = TEXT_CONTEXT) -> Dataset:
    """The characters of `files` from this interpreter's standard library, as sequences of
    `context` tokens and their next tokens; the first 90% of each file trains, the rest
    tests (a split fixed by the files alone). A Python whose library ships without source
    (some embedded builds) is told which file is missing."""
    root = sysconfig.get_paths()["stdlib"]
    train, test = [], []
    for name in files:
        path = os.path.join(root, name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise FileNotFoundError(f"text corpus: cannot read {path} ({exc.strerror}); this "
                                    "Python's standard library has no source for it") from None
        tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clamp(max=TEXT_VOCAB - 1)
        cut = int(0.9 * len(tokens))
        train.append(tokens[:cut])
        test.append(tokens[cut:])

    def sequences(parts: list[Tensor]) -> tuple[Tensor, Tensor]:
        stream = torch.cat(parts).long()
        n = (len(stream) - 1) // context
        return (stream[:n * context].view(n, context),
                stream[1:n * context + 1].view(n, context))

    return Dataset("text", *sequences(train), *sequences(test), num_classes=TEXT_VOCAB,
                   kind="text")


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only what a CIFAR-10 batch (a dict of bytes, lists and one numpy array)
    needs; any other global, and so any code a tampered pickle would run, is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of one CIFAR-10 python batch file."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, UnicodeDecodeError) as exc:
        raise ValueError(f"CIFAR-10 file {path} is corrupt or not a CIFAR-10 python batch: "
                         f"{exc}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"CIFAR-10 file {path}: expected a dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        raise ValueError(f"CIFAR-10 file {path}: 'data' must be a uint8 array (N, 3072)")
    try:
        labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    except (TypeError, ValueError):
        labels = np.zeros(0, np.int64)
    if labels.shape != (data.shape[0],) or labels.size == 0 or labels.min() < 0 \
            or labels.max() > 9:
        raise ValueError(f"CIFAR-10 file {path}: 'labels' must be {data.shape[0]} ints in 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str) -> Dataset:
    """CIFAR-10 from the folder of its python batches, normalized per channel."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"CIFAR-10 folder {data_dir!r} does not exist or is not a "
                                "folder (download and extract cifar-10-python.tar.gz, then "
                                "pass its cifar-10-batches-py folder)")
    missing = [f for f in CIFAR_FILES if not os.path.isfile(os.path.join(data_dir, f))]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder {data_dir!r} lacks {', '.join(missing)}")
    parts = [read_cifar_batch(os.path.join(data_dir, f)) for f in CIFAR_FILES]
    train_x = np.concatenate([p[0] for p in parts[:5]])
    train_y = np.concatenate([p[1] for p in parts[:5]])
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def norm(a: np.ndarray) -> Tensor:
        return (torch.from_numpy(a).float() / 255 - mean) / std

    black = tuple(-m / s for m, s in zip(CIFAR_MEAN, CIFAR_STD))
    return Dataset("cifar10", norm(train_x), torch.from_numpy(train_y), norm(parts[5][0]),
                   torch.from_numpy(parts[5][1]), num_classes=10, augment=True, black=black)


def batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator | None = None,
            augment: bool = False, black: tuple[float, ...] | None = None
            ) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches, shuffled when `generator` is given; `augment` applies the standard
    CIFAR random crop (4 pixels of black padding: `black` is a black pixel's per-channel
    value in the normalized data, 0 when not given) and horizontal flip."""
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        xb = x[idx]
        if augment:
            xb = _crop_flip(xb, generator, black)
        yield xb, y[idx]


def _crop_flip(x: Tensor, generator: torch.Generator | None,
               black: tuple[float, ...] | None) -> Tensor:
    n, c, h, w = x.shape
    fill = torch.tensor(black if black is not None else (0.0,) * c, dtype=x.dtype,
                        device=x.device)
    padded = fill.view(1, c, 1, 1).repeat(n, 1, h + 8, w + 8)
    padded[:, :, 4:4 + h, 4:4 + w] = x
    dy = torch.randint(0, 9, (n,), generator=generator).tolist()
    dx = torch.randint(0, 9, (n,), generator=generator).tolist()
    out = torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out
