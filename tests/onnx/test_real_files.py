"""Every option of ``optimize`` on files lfpass did not make, run by absolute path from another
folder. The zoo (``tools/zoo.py``) is made here, nothing downloaded: a converter-style CNN
whose weights and BatchNorm statistics are ``Constant`` nodes named unlike their nodes (with a
depthwise conv), and torchvision MobileNet / ResNet / EfficientNet and transformers BERT /
GPT-2 / ViT from their configs through both torch exporters, inline and with external data.
The first two run every option set; the rest the calibrated ones (``tools/real_files.py``
runs every option on every model and writes docs/REAL_FILES.md). Each run ends with a valid file
(onnx.checker, onnxruntime, every external tensor next to it) or a non-zero exit with one
line; never an internal error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lfpass.cli import main

ZOO_FILE = Path(__file__).resolve().parents[2] / "tools" / "zoo.py"
_spec = importlib.util.spec_from_file_location("lfpass_tools_zoo", ZOO_FILE)
zoo_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo_module)
OPTIONS, ZOO, CELLS, converter_cnn = zoo_module.OPTIONS, zoo_module.ZOO, zoo_module.CELLS, zoo_module.converter_cnn
PARAMS = [pytest.param(*cell, marks=pytest.mark.slow) if cell in zoo_module.SLOW else cell for cell in CELLS]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Each model built once, on first use, with its calibration ``.npz`` in another folder."""
    made = {}

    def get(name):
        pytest.importorskip("torchvision")
        pytest.importorskip("transformers")
        if name not in made:
            build, arrays, _ = ZOO[name]
            folder = tmp_path_factory.mktemp(name)
            build(folder / "model.onnx")
            calib = tmp_path_factory.mktemp(f"{name}-calib") / "calib.npz"
            np.savez(calib, **arrays(np.random.default_rng(1)))
            made[name] = (folder / "model.onnx", calib)
        return made[name]

    return get


def _check_written(path) -> None:
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert all((path.parent / loc).exists() for loc in locations), locations
    assert locations <= {f"{path.name}.data"}, locations  # nothing points at the input's data file
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("model, option", PARAMS)
def test_every_option_on_files_lfpass_did_not_make(zoo, tmp_path, monkeypatch, capsys, model, option):
    source, calib = zoo(model)
    before = {p.name: p.read_bytes() for p in source.parent.iterdir()}
    monkeypatch.chdir(tmp_path)  # another folder; the model by absolute path
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    args = [a.format(calib=calib) for a in OPTIONS[option]]
    rc = main(["optimize", str(source), "-o", str(out), *args])
    err = capsys.readouterr().err
    assert "internal error" not in err, err
    assert rc in (0, 1), err
    if out.exists():
        _check_written(out)
    else:
        assert "nothing" in err.lower() or rc == 0, err
    assert {p.name: p.read_bytes() for p in source.parent.iterdir()} == before  # the input is never touched
