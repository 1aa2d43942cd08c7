"""Data loaders: real digits from installed packages; CIFAR-10 and WikiText-2 from
small folders written here in the published layouts."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from lfpass.core.errors import InputError
from lfpass.data import (CIFAR10_MEAN, CIFAR10_STD, EOS, UNK, Vocab, batchify, cifar10, lm_batches, mnist_digits,
                         sklearn_digits, stratified_split, wikitext2)

# -- digits -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    return mnist_digits(seed=0)


def test_mnist_shapes_and_types(mnist):
    assert mnist.x_train.shape == (4000, 1, 28, 28) and mnist.x_test.shape == (1000, 1, 28, 28)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert mnist.y_train.shape == (4000,) and mnist.y_test.shape == (1000,)
    assert mnist.num_classes == 10
    # normalised with MNIST's mean/std: background pixels sit at -mean/std, data is centred near 0
    assert mnist.x_train.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert abs(mnist.x_train.mean().item()) < 0.2


def test_mnist_split_is_stratified_and_seeded(mnist):
    assert torch.bincount(mnist.y_test, minlength=10).tolist() == [100] * 10
    again = mnist_digits(seed=0)
    assert torch.equal(again.x_train, mnist.x_train) and torch.equal(again.y_test, mnist.y_test)
    other = mnist_digits(seed=1)
    assert not torch.equal(other.y_train, mnist.y_train)
    # train and test are disjoint: no test image appears in train
    train_rows = {r.numpy().tobytes() for r in mnist.x_train.flatten(1)}
    assert not any(r.numpy().tobytes() in train_rows for r in mnist.x_test.flatten(1)[:200])


def test_mnist_head_and_datasets(mnist):
    small = mnist.head(100, 20)
    assert len(small.train) == 100 and len(small.test) == 20
    x, y = small.train[0]
    assert x.shape == (1, 28, 28) and y.dtype == torch.int64


def test_sklearn_digits():
    pytest.importorskip("sklearn")
    d = sklearn_digits(seed=0, test_fraction=0.25)
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_test.shape[1:] == (1, 8, 8)
    assert len(d.x_train) + len(d.x_test) == 1797
    assert d.x_train.dtype == torch.float32 and d.y_test.dtype == torch.int64
    assert abs(d.x_train.mean().item()) < 1e-4 and d.x_train.std().item() == pytest.approx(1.0, abs=1e-3)


def test_sklearn_digits_split_is_stratified_and_seeded():
    pytest.importorskip("sklearn")
    d = sklearn_digits(seed=0, test_fraction=0.25)
    train_counts = torch.bincount(d.y_train, minlength=10)
    test_counts = torch.bincount(d.y_test, minlength=10)
    # every class split in the same proportion (each of the 10 classes has 174 to 183 digits)
    assert torch.all((test_counts.double() / (train_counts + test_counts) - 0.25).abs() < 0.01)
    again = sklearn_digits(seed=0, test_fraction=0.25)
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_test, d.y_test)
    assert not torch.equal(sklearn_digits(seed=1, test_fraction=0.25).y_train, d.y_train)


def test_stratified_split():
    labels = np.array([0] * 10 + [1] * 20 + [2] * 30)
    train, test = stratified_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(60))  # disjoint, and nothing lost
    assert np.bincount(labels[test]).tolist() == [2, 4, 6]
    assert np.bincount(labels[train]).tolist() == [8, 16, 24]
    assert not np.array_equal(np.sort(test), test)  # shuffled, not in label order
    again = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=1)[1], test)
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(labels, 0.0, seed=0)


def test_bad_test_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        mnist_digits(test_fraction=1.5)


# -- CIFAR-10 ---------------------------------------------------------------


def _write_batch(path, n, seed, overrides=None):
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"fake batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }
    batch.update(overrides or {})
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return batch


@pytest.fixture
def cifar_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [_write_batch(folder / f"data_batch_{i}", 2, i) for i in range(1, 6)]
    test = _write_batch(folder / "test_batch", 3, 99)
    return tmp_path, batches, test


def test_cifar10_reads_the_python_layout(cifar_root):
    root, batches, test = cifar_root
    x, y = cifar10(root, train=True)
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [v for b in batches for v in b[b"labels"]]
    # rows are R(32x32) G B in row-major order; pixel (row 1, col 5) of the green plane of image 0:
    raw = batches[0][b"data"][0, 1024 + 32 + 5]
    assert x[0, 1, 1, 5].item() == pytest.approx((raw / 255 - CIFAR10_MEAN[1]) / CIFAR10_STD[1], abs=1e-5)

    xt, yt = cifar10(root / "cifar-10-batches-py", train=False)  # the folder itself works too
    assert xt.shape == (3, 3, 32, 32) and yt.tolist() == test[b"labels"]


def test_cifar10_missing_folder_and_files(tmp_path, cifar_root):
    with pytest.raises(InputError, match="no such folder.*never downloads"):
        cifar10(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no CIFAR-10 batches"):
        cifar10(empty)
    root, _, _ = cifar_root
    os.remove(root / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(InputError, match="data_batch_3: missing"):
        cifar10(root, train=True)
    assert cifar10(root, train=False)[0].shape[0] == 3  # the test split needs only test_batch


def test_cifar10_malformed_batches(cifar_root):
    root, _, _ = cifar_root
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(InputError, match="not a CIFAR-10 python batch"):
        cifar10(root, train=False)
    _write_batch(path, 2, 0, {b"data": np.zeros((2, 100), np.uint8)})
    with pytest.raises(InputError, match=r"uint8 \[N, 3072\]"):
        cifar10(root, train=False)
    _write_batch(path, 2, 0, {b"labels": [1]})
    with pytest.raises(InputError, match="'labels' must be 2 integers"):
        cifar10(root, train=False)
    _write_batch(path, 2, 0, {b"labels": [1, 12]})
    with pytest.raises(InputError, match="0..9"):
        cifar10(root, train=False)


class _Hostile:
    def __reduce__(self):
        return (os.remove, ("/nonexistent-lfpass-test-file",))


def test_cifar10_refuses_code_in_pickles(cifar_root):
    root, _, _ = cifar_root
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Hostile(), b"labels": []}, f)
    with pytest.raises(InputError, match="refusing to load posix.remove|refusing to load os.remove"):
        cifar10(root, train=False)


# -- WikiText-2 -------------------------------------------------------------

TRAIN = " = Title = \n\n the cat sat on the mat \n the dog sat \n"
VALID = " the cat ran \n"
TEST = " a dog sat \n"


@pytest.fixture
def wiki_root(tmp_path):
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    for split, text in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        (folder / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    return tmp_path


def test_wikitext2_train_ids_and_vocab(wiki_root):
    ids, vocab = wikitext2(wiki_root, "train")
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert vocab.itos[:2] == [UNK, EOS]
    words = [vocab.itos[i] for i in ids.tolist()]
    # whitespace tokens, <eos> closing every line (the blank one too)
    assert words == [
        "=", "Title", "=", EOS, EOS, "the", "cat", "sat", "on", "the", "mat", EOS, "the", "dog", "sat", EOS,
    ]
    assert len(vocab) == 2 + len({"=", "Title", "the", "cat", "sat", "on", "mat", "dog"})


def test_wikitext2_other_splits_share_the_train_vocab(wiki_root):
    _, vocab = wikitext2(wiki_root, "train")
    valid, v2 = wikitext2(wiki_root, "valid")
    assert v2.itos == vocab.itos
    assert [vocab.itos[i] for i in valid.tolist()] == ["the", "cat", UNK, EOS]  # "ran" is not in train
    test, v3 = wikitext2(wiki_root, "test", vocab=vocab)
    assert v3 is vocab and [vocab.itos[i] for i in test.tolist()] == [UNK, "dog", "sat", EOS]
    assert torch.equal(wikitext2(wiki_root, "validation", vocab=vocab.itos)[0], valid)


def test_wikitext2_raw_subfolder(tmp_path):
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    (folder / "wiki.train.raw").write_text(TRAIN, encoding="utf-8")
    ids, vocab = wikitext2(tmp_path)
    assert ids.numel() == 16 and "Title" in vocab.stoi


def test_wikitext2_errors(tmp_path, wiki_root):
    with pytest.raises(InputError, match="no such folder.*never downloads"):
        wikitext2(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"no wiki\.train\.tokens"):
        wikitext2(empty)
    with pytest.raises(InputError, match="unknown split 'dev'"):
        wikitext2(wiki_root, "dev")
    with pytest.raises(InputError, match="not in the vocabulary"):
        wikitext2(wiki_root, "valid", vocab=["the", "cat", EOS])
    (wiki_root / "wikitext-2" / "wiki.test.tokens").write_bytes(b"\xff\xfe bad \n")
    with pytest.raises(InputError, match="not UTF-8"):
        wikitext2(wiki_root, "test")
    (wiki_root / "wikitext-2" / "wiki.test.tokens").write_text("\n\n")
    with pytest.raises(InputError, match="no words"):
        wikitext2(wiki_root, "test")


def test_vocab_build_and_encode():
    vocab = Vocab.build(["b", "a", "b", EOS, "c"])
    assert vocab.itos == [UNK, EOS, "b", "a", "c"] and len(vocab) == 5  # specials, then first appearance
    assert vocab.encode(["a", "zzz", "c"]) == [3, 0, 4]  # an unknown word is <unk>
    with pytest.raises(InputError, match="not in the vocabulary"):
        Vocab(["a", EOS]).encode(["b"])


def test_vocab_rejects_repeats():
    with pytest.raises(InputError, match="repeated"):
        Vocab(["a", "b", "a"])


def test_batchify_and_lm_batches():
    ids = torch.arange(23)
    rows = batchify(ids, 4)
    assert rows.shape == (4, 5) and rows[1].tolist() == [5, 6, 7, 8, 9]
    windows = list(lm_batches(ids, seq_len=3, batch_size=4))
    assert [tuple(x.shape) for x, _ in windows] == [(4, 3), (4, 1)]
    for x, y in windows:
        assert torch.equal(y, x + 1)  # targets are the next token
    assert torch.equal(torch.cat([x for x, _ in windows], 1), rows[:, :-1])
    with pytest.raises(InputError, match="too few"):
        batchify(torch.arange(5), 4)
    with pytest.raises(ValueError, match="seq_len"):
        list(lm_batches(ids, 0, 2))
