"""``--inputs`` as users have them: an ``.npz``, one ``.npy`` array, a folder of images, or a
text file with ``--tokenizer``; the last three become arrays named after the model's inputs
(:mod:`lfpass.data.calibration`) before any work."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lfpass.core.errors import ConfigError, InputError, first_line
from lfpass.data.calibration import IMAGENET_MEAN, IMAGENET_STD, ImageOptions, InputSpec, image_folder, text_lines
from lfpass.onnx import inputs as onnx_inputs
from lfpass.onnx.load import load_model


def add_input_options(p: argparse.ArgumentParser) -> None:
    """``--tokenizer`` and the image options, beside ``--inputs``."""
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="with --inputs LINES.txt: a Hugging Face tokenizer saved in DIR; one sample per line")
    p.add_argument("--max-length", type=int, default=128,
                   help="with --tokenizer: tokens per line where the model leaves the length open (default 128)")
    p.add_argument("--image-mean", type=_floats, default=IMAGENET_MEAN, metavar="M[,M,M]",
                   help="with --inputs DIR: per-channel mean after scaling pixels to [0, 1] (default ImageNet's)")
    p.add_argument("--image-std", type=_floats, default=IMAGENET_STD, metavar="S[,S,S]",
                   help="with --inputs DIR: per-channel std (default ImageNet's)")
    p.add_argument("--image-size", type=_size, default=(224, 224), metavar="HxW",
                   help="with --inputs DIR: height and width where the model leaves them open (default 224x224)")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers, got {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"HEIGHTxWIDTH, e.g. 224x224, got {text!r}") from None
    return h, w


def specs(model) -> list[InputSpec]:
    """The model's runtime inputs as :class:`InputSpec` (open sizes ``None``)."""
    out = []
    for v in onnx_inputs.runtime_inputs(model):
        dims = list(v.shape.dims) if v.shape is not None else []
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in dims)
        dtype = np.dtype(v.dtype.numpy()) if v.dtype is not None else np.dtype(np.float32)
        out.append(InputSpec(v.name, dtype, shape))
    return out


def resolve_inputs(args: argparse.Namespace, model_path: Path, given: Path | None = None):
    """``--inputs`` (or ``given``) as ``optimize`` takes it: the path of an ``.npz``, or the
    arrays made from a ``.npy``, a folder of images or a text file (a :class:`Given`)."""
    path = given if given is not None else getattr(args, "inputs", None)
    tokenizer = getattr(args, "tokenizer", None)
    if path is None:
        if tokenizer is not None:
            raise ConfigError("--tokenizer reads --inputs LINES.txt: give the text file")
        return None
    path = Path(path)
    text = path.suffix.lower() == ".txt"
    if tokenizer is not None and not text:
        raise ConfigError(f"--tokenizer reads a text file of one sample per line; {path} is not a .txt file")
    if not path.is_dir() and not text and path.suffix.lower() != ".npy":
        return path  # an .npz: read and checked where it is used
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    inputs = specs(load_model(model_path))
    if text:
        if tokenizer is None:
            raise ConfigError(f"{path}: a text file needs --tokenizer DIR (the model's Hugging Face tokenizer)")
        arrays = text_lines(path, tokenizer, inputs, args.max_length)
    elif path.is_dir():
        images = [s for s in inputs if len(s.shape) == 4 and s.dtype.kind == "f"]
        if len(inputs) != 1 or not images:
            raise InputError(f"{path}: a folder of images feeds a model with one 4-D float input; "
                             f"{model_path.name} has {', '.join(f'{s.name} {list(s.shape)}' for s in inputs)}")
        options = ImageOptions(tuple(args.image_mean), tuple(args.image_std), tuple(args.image_size))
        arrays = {images[0].name: image_folder(path, images[0], options)}
    else:
        if len(inputs) != 1:
            raise InputError(f"{path}: one .npy array feeds a model with one input; {model_path.name} has "
                             f"{len(inputs)} ({', '.join(s.name for s in inputs)}): save them by name in an .npz")
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable .npy file ({first_line(exc)})") from None
        if not isinstance(array, np.ndarray):
            raise InputError(f"{path}: an .npz archive with a .npy name; rename it .npz")
        arrays = {inputs[0].name: array}
    return onnx_inputs.Given(arrays, str(path))
