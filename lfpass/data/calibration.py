"""Calibration inputs from what users have: a folder of images, a text file and a tokenizer.

A model's calibration and validation inputs are arrays named after its inputs
(an ``.npz``). Users seldom have those; they have pictures and sentences. This
module makes the arrays, knowing nothing of any IR: the caller describes each
model input (:class:`InputSpec`: name, dtype, shape with ``None`` for open
sizes), as the ONNX frontend reads them from a graph.

- **images** (:func:`image_folder`): every readable image file of a folder,
  sorted by name, as one float32 batch laid out as the model's single image
  input is (``NCHW`` when axis 1 holds 1 or 3 channels, ``NHWC`` when the last
  axis does), resized to its fixed height and width (``size`` for open ones),
  scaled to ``[0, 1]``, then ``(x - mean) / std`` per channel
  (:class:`ImageOptions`; ImageNet's by default);
- **text** (:func:`text_lines`): one sample per non-empty line, tokenized by a
  Hugging Face tokenizer saved on disk (``save_pretrained``; read offline),
  padded and truncated to the model's fixed sequence length (``max_length`` for
  an open one), each array named after the model input it feeds
  (``input_ids``, ``attention_mask``, ``token_type_ids``) in the model's dtype.

Wrong files get one :class:`InputError` line naming the file and what was
expected: a folder without images, an image that does not decode, a model
with no image-shaped input, a tokenizer that makes none of the model's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lfpass.core.errors import ConfigError, InputError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, numpy dtype and shape (``None`` where the size is open)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class ImageOptions:
    """How pictures become a model's input: ``mean``/``std`` per channel (after scaling to
    ``[0, 1]``; one value applies to every channel), ``size`` ``(height, width)`` where the
    model leaves them open, ``limit`` on how many files are read (0: all)."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    size: tuple[int, int] = (224, 224)
    limit: int = 0

    def __post_init__(self) -> None:
        if not self.mean or not self.std or len(self.mean) != len(self.std):
            raise ConfigError(f"image mean and std: give as many values each (one, or one per channel), got "
                              f"{list(self.mean)} and {list(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"image std: every value must be > 0, got {list(self.std)}")
        if len(self.size) != 2 or any(int(s) < 1 for s in self.size):
            raise ConfigError(f"image size: two sizes >= 1 (height, width), got {list(self.size)}")


def image_layout(spec: InputSpec) -> str:
    """``"NCHW"`` or ``"NHWC"``: where ``spec`` (4-D) keeps its 1 or 3 channels."""
    if len(spec.shape) != 4:
        raise InputError(f"input {spec.name!r} has {len(spec.shape)} dimensions; an image batch has 4")
    if spec.shape[1] in (1, 3):
        return "NCHW"
    if spec.shape[3] in (1, 3):
        return "NHWC"
    raise InputError(f"input {spec.name!r} has shape {_shown(spec.shape)}: no axis of 1 or 3 channels after the "
                     "batch (NCHW) or last (NHWC)")


def image_folder(folder: str | Path, spec: InputSpec, options: ImageOptions = ImageOptions()) -> np.ndarray:
    """The images of ``folder`` (sorted by file name) as one batch for the model input ``spec``."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    files = files[:options.limit] if options.limit else files
    layout = image_layout(spec)
    channels = spec.shape[1] if layout == "NCHW" else spec.shape[3]
    height, width = (spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2])
    height, width = height or options.size[0], width or options.size[1]
    mean, std = (np.asarray(v, np.float32) for v in (options.mean, options.std))
    if len(mean) not in (1, channels):
        raise ConfigError(f"image mean and std: {len(mean)} values for {channels} channels")
    batch = []
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable image ({first_line(exc)})") from None
        array = array.reshape(height, width, channels)
        batch.append((array - mean) / std)
    out = np.stack(batch)
    out = out if layout == "NHWC" else out.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out.astype(spec.dtype))


def text_lines(path: str | Path, tokenizer: str | Path, specs: Sequence[InputSpec], max_length: int = 128,
               limit: int = 0) -> dict[str, np.ndarray]:
    """The non-empty lines of the text file ``path``, tokenized by the tokenizer saved in the folder
    ``tokenizer``, as arrays named after the model inputs ``specs`` it makes."""
    path, tokenizer = Path(path), Path(tokenizer)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable UTF-8 text file ({first_line(exc)})") from None
    if not lines:
        raise InputError(f"{path}: no lines of text")
    lines = lines[:limit] if limit else lines
    tok = _tokenizer(tokenizer)
    seq = {spec.shape[1] for spec in specs if len(spec.shape) == 2 and spec.shape[1] is not None}
    length = seq.pop() if len(seq) == 1 else max_length
    encoded = tok(lines, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    made = {spec.name: encoded[spec.name] for spec in specs if spec.name in encoded}
    if not made:
        raise InputError(f"{tokenizer}: the tokenizer makes {', '.join(sorted(encoded))}, none of the model's inputs "
                         f"({', '.join(s.name for s in specs)})")
    left = [s.name for s in specs if s.name not in made]
    if left:
        raise InputError(f"{tokenizer}: the tokenizer makes {', '.join(sorted(encoded))} but not the model's "
                         f"{', '.join(left)}")
    return {spec.name: made[spec.name].astype(spec.dtype) for spec in specs}


def _tokenizer(folder: Path):
    """A Hugging Face tokenizer saved in ``folder``, read offline."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder holding a saved tokenizer (tokenizer.json, vocab.txt, ...)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise InputError("--tokenizer needs the transformers package (pip install transformers)") from None
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{folder}: not a saved tokenizer ({first_line(exc)})") from None


def _shown(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
