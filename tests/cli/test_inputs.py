"""``--inputs`` as users have them: a folder of images (laid out and sized by the model's input),
a text file with ``--tokenizer``, one ``.npy`` array; in Python, any iterable of batches or a
``DataLoader``. Wrong files get one line naming the file and what was expected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lfpass
from lfpass.cli import main
from lfpass.core.config import FusionConfig
from tests.onnx.test_real_files import converter_cnn  # a converter's CNN: image [N, 3, 16, 16]

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the a of to and in is it that was".split(),
         *"king queen lord lady sword crown night day love death".split()]


def _images(folder, n=12, size=(20, 24)):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def _one_line_error(capsys, rc, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and all(w in err[0] for w in words), err


def test_a_folder_of_images_calibrates_a_cnn_resized_to_its_input(tmp_path, capsys):
    src = tmp_path / "cnn.onnx"
    converter_cnn(src)
    folder = _images(tmp_path / "images")
    rc = main(["optimize", str(src), "--inputs", str(folder), "--max-error", "0.05", "-o", str(tmp_path / "o.onnx"),
               "--image-mean", "0.5", "--image-std", "0.25"])
    err = capsys.readouterr().err
    assert rc in (0, 1) and "error" not in err.split("lfpass:")[0], err
    assert (tmp_path / "o.onnx").exists()

    from lfpass.data.calibration import ImageOptions, InputSpec, image_folder

    spec = InputSpec("image", np.dtype(np.float32), (None, 3, 16, 16))
    batch = image_folder(folder, spec, ImageOptions(mean=(0.5,), std=(0.25,)))
    assert batch.shape == (12, 3, 16, 16) and batch.dtype == np.float32
    assert -2.0 - 1e-6 <= batch.min() and batch.max() <= 2.0 + 1e-6  # (x - 0.5) / 0.25 of pixels in [0, 1]
    nhwc = image_folder(folder, InputSpec("x", np.dtype(np.float32), (None, 8, 8, 3)), ImageOptions(limit=3))
    assert nhwc.shape == (3, 8, 8, 3)


def test_wrong_image_inputs_are_one_line(tmp_path, capsys):
    src = tmp_path / "cnn.onnx"
    converter_cnn(src)
    (tmp_path / "empty").mkdir()
    rc = main(["optimize", str(src), "--inputs", str(tmp_path / "empty"), "--max-error", "0.05"])
    _one_line_error(capsys, rc, "empty", "no image files")
    folder = _images(tmp_path / "images", n=2)
    (folder / "broken.png").write_bytes(b"not a picture")
    rc = main(["optimize", str(src), "--inputs", str(folder), "--max-error", "0.05"])
    _one_line_error(capsys, rc, "broken.png", "not a readable image")
    assert not list(tmp_path.glob("*.fused.onnx"))


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny BERT-style encoder exported with inputs input_ids and attention_mask, and a
    WordPiece tokenizer saved beside it."""
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("text")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    tok.save_pretrained(root / "tok")

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(len(VOCAB), 32)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(4))

        def forward(self, input_ids, attention_mask):
            x = self.embed(input_ids) * attention_mask.unsqueeze(-1).float()
            for layer in self.layers:
                x = x + torch.tanh(layer(x))
            return x

    torch.manual_seed(0)
    path = root / "enc.onnx"
    ids = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        torch.onnx.export(Encoder().eval(), (ids, ids), str(path), dynamo=False,
                          input_names=["input_ids", "attention_mask"],
                          dynamic_axes={"input_ids": {0: "n", 1: "s"}, "attention_mask": {0: "n", 1: "s"}})
    lines = root / "lines.txt"
    words = VOCAB[5:]
    rng = np.random.default_rng(0)
    lines.write_text("\n".join(" ".join(rng.choice(words, rng.integers(3, 9))) for _ in range(64)) + "\n\n")
    return path, lines, root / "tok"


def test_a_text_file_and_a_tokenizer_calibrate_a_bert_style_model(text_model, tmp_path, capsys):
    path, lines, tok = text_model
    rc = main(["optimize", str(path), "--inputs", str(lines), "--tokenizer", str(tok), "--max-length", "12",
               "--max-error", "0.05", "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert rc in (0, 1) and (tmp_path / "o.onnx").exists(), err

    from lfpass.cli.inputs import specs
    from lfpass.data.calibration import text_lines
    from lfpass.onnx.load import load_model

    arrays = text_lines(lines, tok, specs(load_model(path)), max_length=12)
    assert set(arrays) == {"input_ids", "attention_mask"} and arrays["input_ids"].shape == (64, 12)
    assert arrays["input_ids"].dtype == np.int64 and arrays["attention_mask"].sum(1).min() >= 5  # CLS, SEP, 3 words


def test_wrong_text_inputs_are_one_line(text_model, tmp_path, capsys):
    path, lines, tok = text_model
    rc = main(["optimize", str(path), "--inputs", str(lines), "--max-error", "0.05"])
    _one_line_error(capsys, rc, "needs --tokenizer")
    rc = main(["optimize", str(path), "--inputs", str(lines), "--tokenizer", str(tmp_path), "--max-error", "0.05"])
    _one_line_error(capsys, rc, str(tmp_path), "not a saved tokenizer")
    src = tmp_path / "cnn.onnx"
    converter_cnn(src)  # its input is an image: the tokenizer makes none of it
    rc = main(["optimize", str(src), "--inputs", str(lines), "--tokenizer", str(tok), "--max-error", "0.05"])
    _one_line_error(capsys, rc, "none of the model's inputs", "image")


def test_a_npy_array_and_python_batches_feed_a_one_input_model(tmp_path, capsys):
    src = tmp_path / "cnn.onnx"
    converter_cnn(src)
    x = np.random.default_rng(0).standard_normal((48, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    rc = main(["optimize", str(src), "--inputs", str(tmp_path / "x.npy"), "--max-error", "0.05",
               "-o", str(tmp_path / "a.onnx")])
    assert rc in (0, 1), capsys.readouterr().err
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(x)), batch_size=16)
    config = FusionConfig(target_ratio=None, max_error=0.05)
    by_loader = lfpass.optimize(src, tmp_path / "b.onnx", config, inputs=(b for (b,) in loader))
    by_dicts = lfpass.optimize(src, tmp_path / "c.onnx", config, inputs=[{"image": x[i:i + 16]} for i in (0, 16, 32)])
    assert by_loader.plan.params_after == by_dicts.plan.params_after  # the same samples either way
    assert by_loader.error == pytest.approx(by_dicts.error)
    with pytest.raises(lfpass.InputError, match="holds 2 arrays but the model has 1 inputs"):
        lfpass.optimize(src, tmp_path / "d.onnx", config, inputs=[(x[:8], x[:8])])


def test_distillation_reads_a_folder_of_images_too(tmp_path, capsys):
    pytest.importorskip("onnx2torch")
    src = tmp_path / "cnn.onnx"
    converter_cnn(src)
    folder = _images(tmp_path / "images", n=24)
    rc = main(["optimize", str(src), "--distill", str(folder), "--ratio", "1.2", "--stages", "1", "--steps", "3",
               "-o", str(tmp_path / "d.onnx")])
    err = capsys.readouterr().err
    assert rc in (0, 1) and "internal error" not in err and (tmp_path / "d.onnx").exists(), err
    (tmp_path / "empty").mkdir()
    rc = main(["optimize", str(src), "--distill", str(tmp_path / "empty"), "--ratio", "1.2"])
    _one_line_error(capsys, rc, "no image files")
