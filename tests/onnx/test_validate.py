"""Validation never passes on nothing: one test per way it used to (no samples, empty
inputs or outputs, NaN, exploding relative error, open input dimensions, a wrong or
unreadable ``.npz``, an enormous ``--input-shape``) and the note about random inputs."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lfpass import cli
from lfpass.core.errors import ConfigError, InputError
from lfpass.onnx import inputs as onnx_inputs
from lfpass.onnx.load import load_model
from lfpass.onnx.validate import compare, min_cosine, validate

WIDTH = 32
ATOL, RTOL = 1e-3, 1e-2


def _save(path: Path, nodes: list, inputs: list, inits: list = ()) -> Path:
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _linear(path: Path, dims: list = ("batch", WIDTH), op: str = "Tanh") -> Path:
    """``op(x @ W)`` with a constant ``WIDTH x WIDTH`` weight; ``x`` declared with ``dims``."""
    weight = numpy_helper.from_array(np.eye(WIDTH, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node(op, ["m"], ["y"])]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))], [weight])


def _reshape(path: Path) -> Path:
    """A 1-D input of unnamed size that only runs with 32 elements (reshaped to 4x8)."""
    shape = numpy_helper.from_array(np.array([4, 8], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])], [shape])


@pytest.fixture
def model(tmp_path) -> Path:
    return _linear(tmp_path / "m.onnx")


def _run(capsys, *argv) -> tuple[int, str, list[str]]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, [line for line in err.splitlines() if line.startswith("lfpass:")]


def _one(n: float) -> list[dict[str, np.ndarray]]:
    return [{"y": np.array([[n, 1.0, -2.0]], np.float32)}]


# -- nothing to compare ---------------------------------------------------------------------

def test_zero_samples_fail(model):
    for result in (compare([], [], ATOL, RTOL), validate(model, model, [], ATOL, RTOL)):
        assert not result.passed and "nothing" in result.error
        assert result.summary().startswith("FAILED")


def test_zero_size_batch_fails(tmp_path, model, capsys):
    result = validate(model, model, [{"x": np.zeros((0, WIDTH), np.float32)}], ATOL, RTOL)
    assert not result.passed and "empty input" in result.error
    with pytest.raises(ConfigError, match="dimension of 0"):
        onnx_inputs.parse_input_shapes([f"x:0x{WIDTH}"])
    code, _, err = _run(capsys, "validate", model, model, "--input-shape", f"x:0x{WIDTH}")
    assert code == 2 and len(err) == 1 and "dimension of 0 gives nothing to compare" in err[0]


def test_empty_output_is_nothing_compared():
    empty = [{"y": np.zeros((0, 4), np.float32)}]
    result = compare(empty, empty, ATOL, RTOL)
    out = result.outputs[0]
    assert not result.passed and not out.passed and "nothing compared" in out.reason
    assert math.isnan(out.cosine) and "nothing compared" in result.summary()
    assert result.to_dict()["outputs"]["y"]["cosine"] is None


def test_empty_npz_is_an_input_error(tmp_path, model, capsys):
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(InputError, match="no arrays"):
        onnx_inputs.load_npz(tmp_path / "empty.npz", load_model(model))
    np.savez(tmp_path / "zero.npz", x=np.zeros((0, WIDTH), np.float32))
    code, _, err = _run(capsys, "validate", model, model, "--inputs", tmp_path / "zero.npz")
    assert code == 2 and len(err) == 1 and "nothing to compare" in err[0]


# -- NaN ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_candidate_fails_with_reason(bad):
    result = compare(_one(0.5), _one(bad), ATOL, RTOL)
    out = result.outputs[0]
    assert not result.passed and "where the original is finite" in out.reason
    assert math.isnan(out.cosine) and "cosine 1" not in result.summary()


def test_nan_reference_blames_the_original(tmp_path, capsys):
    src = _linear(tmp_path / "sqrt.onnx", op="Sqrt")  # N(0,1) inputs: NaN in both models
    result = compare(_one(np.nan), _one(np.nan), ATOL, RTOL)
    assert not result.passed and "original model produces NaN" in result.outputs[0].reason
    code, out, _ = _run(capsys, "validate", src, src, "--report", tmp_path / "r.json")
    assert code == 1 and "original model produces NaN on these inputs" in out and "passed" not in out


# -- relative error -----------------------------------------------------------------------------

def test_relative_error_does_not_explode_near_zero():
    ref = [{"y": np.array([1e-15, 1e-30, 0.0, 0.5], np.float32)}]
    cand = [{"y": np.array([1e-7, 0.0, 1e-9, 0.5], np.float32)}]
    result = compare(ref, cand, ATOL, RTOL)
    assert result.passed and result.outputs[0].max_rel < 1e-5
    assert "e+" not in result.summary()


@pytest.mark.parametrize("atol,rtol", [(1e-3, 1e-2), (1e-5, 1e-1), (1e-2, 1e-6)])
def test_max_rel_agrees_with_the_verdict(atol, rtol):
    rng = np.random.default_rng(0)
    for scale in (1e-12, 1e-3, 1.0, 1e3):
        for noise in (1e-8, 1e-4, 1e-2, 1.0):
            ref = rng.standard_normal(64) * scale
            cand = ref + rng.standard_normal(64) * noise
            result = compare([{"y": ref}], [{"y": cand}], atol, rtol)
            elementwise = bool(np.all(np.abs(cand - ref) <= np.maximum(atol, rtol * np.abs(ref))))
            cosine = ref @ cand / (np.linalg.norm(ref) * np.linalg.norm(cand))
            assert result.passed == (elementwise and cosine >= min_cosine(rtol))
            assert (result.outputs[0].max_rel <= rtol * (1 + 1e-9)) == elementwise


def test_values_within_atol_that_point_elsewhere_fail():
    """Class scores of 1e-4 (inside atol 1e-3) with cosine 0.22: every element passes the
    tolerances, the output does not."""
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((4, 10)) * 1e-4
    cand = 0.25 * ref + rng.standard_normal((4, 10)) * 1e-4
    result = compare([{"logits": ref}], [{"logits": cand}], ATOL, RTOL)
    assert np.all(np.abs(cand - ref) <= ATOL) and not result.passed
    assert "points elsewhere" in result.summary() and result.outputs[0].cosine < 0.9
    assert compare([{"logits": ref}], [{"logits": ref + 1e-9}], ATOL, RTOL).passed


# -- open input dimensions ----------------------------------------------------------------------

@pytest.mark.parametrize("dims", [[-1, WIDTH], [None, None], ["batch", None], [-1, -1]])
def test_open_dims_get_sizes_that_run(tmp_path, capsys, dims):
    src = _linear(tmp_path / "open.onnx", dims)
    feeds = onnx_inputs.generate(load_model(src))
    assert feeds[0]["x"].shape == (1, WIDTH)
    code, out, err = _run(capsys, "validate", src, src)
    assert code == 0 and err == [] and "passed" in out


def test_a_declared_empty_dimension_is_refused(tmp_path, capsys):
    src = _linear(tmp_path / "empty.onnx", [0, WIDTH])  # onnxruntime holds the batch to 0
    code, _, err = _run(capsys, "validate", src, src)
    assert code == 2 and len(err) == 1 and f"(0, {WIDTH})" in err[0] and "nothing to compare" in err[0]


def test_shapes_that_do_not_run_ask_for_input_shape(tmp_path, capsys):
    src = _reshape(tmp_path / "reshape.onnx")
    code, _, err = _run(capsys, "validate", src, src)
    assert code == 2 and len(err) == 1
    assert "--input-shape" in err[0] and not err[0].startswith(f"lfpass: error: {src}")
    assert _run(capsys, "validate", src, src, "--input-shape", "x:32")[0] == 0


# -- the .npz given with --inputs ---------------------------------------------------------------

def test_wrong_npz_blames_the_inputs(tmp_path, model, capsys):
    np.savez(tmp_path / "narrow.npz", x=np.ones((3, 5), np.float32))
    code, _, err = _run(capsys, "validate", model, model, "--inputs", tmp_path / "narrow.npz")
    assert code == 2 and len(err) == 1
    assert f"narrow.npz: x has shape (3, 5) but the model expects (batch, {WIDTH})" in err[0]
    np.savez(tmp_path / "double.npz", x=np.ones((3, WIDTH)))
    with pytest.raises(InputError, match="x is float64 but the model expects float32"):
        onnx_inputs.load_npz(tmp_path / "double.npz", load_model(model))
    src = _reshape(tmp_path / "reshape.onnx")  # the declared shape allows 5 elements; onnxruntime does not
    np.savez(tmp_path / "five.npz", x=np.ones(5, np.float32))
    feeds = onnx_inputs.load_npz(tmp_path / "five.npz", load_model(src))
    with pytest.raises(InputError) as caught:
        validate(src, src, feeds, ATOL, RTOL)
    assert str(caught.value).startswith(str(tmp_path / "five.npz")) and "x:5" in str(caught.value)


def test_unreadable_npz_is_one_input_error(tmp_path, model, capsys):
    np.save(tmp_path / "x.npy", np.ones((3, WIDTH), np.float32))
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    np.savez(tmp_path / "good.npz", x=np.ones((3, WIDTH), np.float32))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    for name, says in (("x.npy", "not an .npz"), ("garbage.npz", "not a readable .npz"),
                       ("cut.npz", "not a readable .npz")):
        with pytest.raises(InputError, match=says):
            onnx_inputs.load_npz(tmp_path / name, load_model(model))
        if name == "x.npy":  # the command line reads one .npy array for a one-input model
            assert _run(capsys, "validate", model, model, "--inputs", tmp_path / name)[0] == 0
            continue
        code, _, err = _run(capsys, "validate", model, model, "--inputs", tmp_path / name)
        assert code == 2 and len(err) == 1 and says in err[0]
    assert zipfile.is_zipfile(tmp_path / "good.npz")


def test_enormous_input_shape_is_refused_before_allocating(model, capsys):
    shape = (10**12, WIDTH)  # 128 TB of float32; numpy would not even get to try
    with pytest.raises(ConfigError, match=r"128,000,000,000,000 bytes.*2 GiB"):
        onnx_inputs.generate(load_model(model), {"x": shape})
    code, _, err = _run(capsys, "validate", model, model, "--input-shape", f"x:{shape[0]}x{WIDTH}")
    assert code == 2 and len(err) == 1 and "2 GiB" in err[0]


# -- random inputs standing in for real ones ----------------------------------------------------

def test_random_input_note(tmp_path, model):
    from lfpass.onnx.inputs import random_input_note

    image = _save(tmp_path / "image.onnx", [helper.make_node("Relu", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])])
    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
    tokens = _save(tmp_path / "tokens.onnx", [helper.make_node("Gather", ["table", "ids"], ["y"])],
                   [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])], [table])
    for src, kind in ((image, "image"), (tokens, "token")):
        note = random_input_note(load_model(src), feeds_were_generated=True)
        assert note is not None and kind in note and "--inputs" in note and "\n" not in note
        assert random_input_note(load_model(src), feeds_were_generated=False) is None
    assert random_input_note(load_model(model), feeds_were_generated=True) is None


def test_placeholder_dim_names_tie_nothing(tmp_path):
    """A converter writes ``?`` for every unknown size: a 3 x 32 input declared ``(?, ?)`` is
    not forced square."""
    src = _linear(tmp_path / "q.onnx", ["?", "?"])
    np.savez(tmp_path / "in.npz", x=np.ones((3, WIDTH), np.float32))
    feeds = onnx_inputs.load_npz(tmp_path / "in.npz", load_model(src))
    assert feeds[0]["x"].shape == (3, WIDTH)
    named = _linear(tmp_path / "n.onnx", ["n", "n"])  # a real name still ties its dimensions
    with pytest.raises(InputError, match="n = "):
        onnx_inputs.load_npz(tmp_path / "in.npz", load_model(named))
