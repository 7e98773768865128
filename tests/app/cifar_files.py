"""Writes small CIFAR-10 python batches in the real format (protocol-2 pickles of a dict
with bytes keys, a uint8 (N, 3072) array and a list of labels) for the tests."""
import pickle

import numpy as np

from svdkern.app.data import CIFAR_FILES


def write_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"training batch", b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return batch


def write_cifar_folder(folder):
    """data_batch_1..5 with 4..8 images, test_batch with 9; returns the dicts by file name."""
    return {name: write_batch(folder / name, 4 + i, i) for i, name in enumerate(CIFAR_FILES)}
