"""Data loading: digits shapes, CIFAR-10 python batches written by the test in the real
format, and clear errors for a missing folder, a missing file, a corrupt or malicious file."""
import os
import pickle

import numpy as np
import pytest
import torch

from tests.app.cifar_files import write_cifar_folder
from svdkern.app.data import CIFAR_FILES, batches, load_cifar10, load_dataset, load_digits


@pytest.fixture
def cifar_dir(tmp_path):
    return tmp_path, write_cifar_folder(tmp_path)


def test_digits_split_and_shapes():
    d = load_digits()
    assert d.train_x.shape[1:] == (1, 8, 8) and d.train_x.dtype == torch.float32
    assert len(d.train_y) + len(d.test_y) == 1797
    assert 0 <= float(d.train_x.min()) and float(d.train_x.max()) <= 1
    assert torch.equal(load_digits().test_y, d.test_y)  # fixed split


def test_cifar_reads_real_format(cifar_dir):
    folder, written = cifar_dir
    d = load_cifar10(str(folder))
    assert d.train_x.shape == (4 + 5 + 6 + 7 + 8, 3, 32, 32) and d.test_x.shape == (9, 3, 32, 32)
    assert d.train_y.tolist() == sum((written[f][b"labels"] for f in CIFAR_FILES[:5]), [])
    raw = written["test_batch"][b"data"][0].reshape(3, 32, 32)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    torch.testing.assert_close(d.test_x[0], (torch.from_numpy(raw).float() / 255 - mean) / std)
    assert d.augment
    torch.testing.assert_close(torch.tensor(d.black).view(3, 1, 1), (0 - mean) / std)


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(str(tmp_path))
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("cifar10", None)


def test_corrupt_file(cifar_dir):
    folder, _ = cifar_dir
    (folder / "data_batch_3").write_bytes(b"\x80\x02}q\x00garbage")
    with pytest.raises(ValueError, match="data_batch_3 is corrupt"):
        load_cifar10(str(folder))


def test_wrong_content(cifar_dir):
    folder, _ = cifar_dir
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match="test_batch: 'data'"):
        load_cifar10(str(folder))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["cat", "dog"]}, f)
    with pytest.raises(ValueError, match="test_batch: 'labels'"):
        load_cifar10(str(folder))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > evil_marker",))


def test_malicious_pickle_runs_no_code(cifar_dir, monkeypatch):
    folder, _ = cifar_dir
    monkeypatch.chdir(folder)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="forbidden global"):
        load_cifar10(str(folder))
    assert not (folder / "evil_marker").exists()


def test_batches_cover_all_and_augment_keeps_shape():
    x, y = torch.randn(10, 3, 32, 32), torch.arange(10)
    seen = torch.cat([yb for _, yb in batches(x, y, 4, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
    xb, _ = next(batches(x, y, 10, torch.Generator().manual_seed(0), augment=True))
    assert xb.shape == x.shape


def test_random_crop_pads_with_black_pixels():
    """The crop's padding is black in the normalized data, not the mean colour (zero)."""
    x, y = torch.full((50, 3, 8, 8), 5.0), torch.arange(50)
    black = (-1.0, -2.0, -3.0)
    xb, _ = next(batches(x, y, 50, torch.Generator().manual_seed(0), True, black))
    for c, value in enumerate(black):
        pixels = xb[:, c].flatten()
        assert set(pixels.unique().tolist()) == {5.0, value}
    # without normalization info the padding is 0, as before
    xb, _ = next(batches(x, y, 50, torch.Generator().manual_seed(0), True))
    assert set(xb.unique().tolist()) == {0.0, 5.0}
