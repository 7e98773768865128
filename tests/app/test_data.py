"""Data loading: digits shapes, CIFAR-10 python batches written by the test in the real
format, and clear errors for a missing folder, a missing file, a corrupt or malicious file;
the text corpus from this interpreter's standard library; validation splits."""
import os
import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from tests.app.cifar_files import write_cifar_folder
from svdkern.app.data import (CIFAR_FILES, TEXT_FILES, batches, load_cifar10, load_dataset,
                              load_digits, load_text)


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


def test_text_corpus_is_the_stdlib_files_split_per_file():
    """Token sequences and their next tokens; the first 90% of each file trains, the rest
    tests, so the first training sequence is the first file's first 64 characters and the
    first test sequence starts at its 90% mark."""
    import sysconfig
    d = load_dataset("text")
    assert d.kind == "text" and d.metric == "perplexity" and d.unit == "token"
    assert d.train_x.shape[1:] == (64,) and d.train_x.dtype == torch.int64
    assert torch.equal(d.train_x[:, 1:], d.train_y[:, :-1])
    assert int(d.train_x.max()) < d.num_classes == 128
    with open(os.path.join(sysconfig.get_paths()["stdlib"], TEXT_FILES[0]), "rb") as f:
        first = f.read()
    assert bytes(d.train_x[0].tolist()) == first[:64]
    cut = int(0.9 * len(first))
    assert bytes(d.test_x[0].tolist()) == first[cut:cut + 64]
    assert torch.equal(load_text().test_y, d.test_y)  # fixed split


def test_text_corpus_missing_file_is_named():
    with pytest.raises(FileNotFoundError, match="no_such_module.py"):
        load_text(("string.py", "no_such_module.py"))


@pytest.mark.parametrize("name", ["digits", "text"])
def test_holdout_carves_validation_from_training_only(name):
    d = load_dataset(name)
    v = d.holdout(0.2)
    n = len(d.train_y)
    assert len(v.train_y) + len(v.test_y) == n and abs(len(v.test_y) - 0.2 * n) <= 20
    # the training samples, split: as multisets, held-out + rest == training (labels too)
    def samples(x, y):
        return Counter((tuple(a.flatten().tolist()), tuple(b.flatten().tolist()))
                       for a, b in zip(x, y))
    assert samples(v.test_x, v.test_y) + samples(v.train_x, v.train_y) == samples(
        d.train_x, d.train_y)
    assert torch.equal(d.holdout(0.2).test_x, v.test_x)  # the same split every time
    if name == "text":  # the last 20 of every 100 consecutive sequences, in order
        held = torch.arange(n) % 100 >= 80
        assert torch.equal(v.test_x, d.train_x[held]) and torch.equal(v.train_x, d.train_x[~held])


def test_holdout_needs_both_parts():
    with pytest.raises(ValueError, match="no validation or no training sample"):
        load_digits().head(3).holdout(0.01)
