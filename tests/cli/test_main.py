"""Invalid models are invalid; every misuse is one line and exit 2, never a traceback;
and a property test that drives the CLI with random arguments and broken files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from lfpass import cli

W = 8


def _save(path: Path, nodes, inits, sparse=None, out: str = "y") -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, W])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, W])], inits,
                              sparse_initializer=sparse)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _w(name: str, value: float = 1.0) -> onnx.TensorProto:
    return numpy_helper.from_array(np.full((W, W), value, np.float32), name)


def _mlp(path: Path, blocks: int = 4) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits, h = [], [], "x"
    for i in range(blocks):
        inits.append(numpy_helper.from_array(rng.standard_normal((W, W)).astype(np.float32), f"b.{i}.weight"))
        nodes += [helper.make_node("MatMul", [h, f"b.{i}.weight"], [f"m{i}"], name=f"/b.{i}/MatMul"),
                  helper.make_node("Tanh", [f"m{i}"], [f"h{i}"])]
        h = f"h{i}"
    return _save(path, nodes, inits, out=h)


def _run(capsys, *argv) -> tuple[int, list[str]]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.strip()]


def _one_line(capsys, *argv, says: str) -> None:
    code, err = _run(capsys, *argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("lfpass: error:") and says in err[0], err
    assert "internal error" not in err[0]


# -- item 5: invalid models are invalid even when nothing would fuse ----------------------------------

def test_cycle(tmp_path, capsys):
    src = _save(tmp_path / "c.onnx", [helper.make_node("MatMul", ["x", "w"], ["a"]),
                                      helper.make_node("Add", ["a", "c"], ["b"]),
                                      helper.make_node("Tanh", ["b"], ["c"]),
                                      helper.make_node("Identity", ["c"], ["y"])], [_w("w")])
    _one_line(capsys, "optimize", src, says="a cycle")
    _one_line(capsys, "analyze", src, "--heatmap", tmp_path / "h.png", says="a cycle")


def test_duplicate_initializer_names(tmp_path, capsys):
    src = _save(tmp_path / "d.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"])], [_w("w"), _w("w", 0.0)])
    _one_line(capsys, "optimize", src, says="two initializers are named 'w'")


def test_value_produced_twice(tmp_path, capsys):
    src = _save(tmp_path / "d.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"]),
                                      helper.make_node("Tanh", ["x"], ["y"])], [_w("w")])
    _one_line(capsys, "validate", src, src, says="produced twice")


def test_undefined_name_in_a_model_with_nothing_to_fuse(tmp_path, capsys):
    src = _save(tmp_path / "u.onnx", [helper.make_node("Tanh", ["nothing"], ["y"])], [])
    _one_line(capsys, "optimize", src, says="which nothing defines")


def test_sparse_initializer_is_declined_with_the_true_reason(tmp_path, capsys):
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sw")
    indices = numpy_helper.from_array(np.array([0, 9], np.int64), "sw_idx")
    src = _save(tmp_path / "s.onnx", [helper.make_node("MatMul", ["x", "sw"], ["y"])], [],
                sparse=[helper.make_sparse_tensor(values, indices, [W, W])])
    _one_line(capsys, "optimize", src, says="sparse initializer 'sw'")


def test_external_data_outside_the_model_folder(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    src = _mlp(tmp_path / "m.onnx")
    onnx.save(onnx.load(src), tmp_path / "e.onnx", save_as_external_data=True, location="e.data", size_threshold=0)
    proto = onnx.load(tmp_path / "e.onnx", load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../e.data"
    onnx.save(proto, tmp_path / "sub" / "outside.onnx")
    _one_line(capsys, "optimize", tmp_path / "sub" / "outside.onnx", says="outside the model's folder")


# -- item 6: one line and exit 2, never a traceback ------------------------------------------------------

@pytest.mark.parametrize("text", ["null", "3", '"plan"', "[]", '{"version": 1, "groups": [[1, 2]]}',
                                  '{"version": 1, "groups": [{"members": "ab"}]}', "{not json"])
def test_bad_plan_json(tmp_path, capsys, text):
    src = _mlp(tmp_path / "m.onnx")
    (tmp_path / "plan.json").write_text(text)
    _one_line(capsys, "optimize", src, "--plan", tmp_path / "plan.json", says="plan")


@pytest.mark.parametrize("argv, says", [
    (["--seed", "-1"], "seed"),
    (["--pipeline", "{folder}"], "is a folder"),
    (["--report", "{folder}"], "is a folder"),
    (["--plan", "{folder}"], "is a folder"),
    (["--max-overshoot", "-1"], "max_overshoot"),
])
def test_misuse_is_one_line(tmp_path, capsys, argv, says):
    src = _mlp(tmp_path / "m.onnx")
    (tmp_path / "folder").mkdir()
    argv = [a.format(folder=tmp_path / "folder") for a in argv]
    _one_line(capsys, "optimize", src, *argv, says=says)


def test_pipeline_with_a_bad_seed(tmp_path, capsys):
    src = _mlp(tmp_path / "m.onnx")
    (tmp_path / "p.toml").write_text("seed = -3\n")
    _one_line(capsys, "optimize", src, "--pipeline", tmp_path / "p.toml", says="seed")


def test_optimize_api_takes_a_dict_config_and_a_plan_path(tmp_path):
    from lfpass.onnx import analyze_onnx, optimize

    src = _mlp(tmp_path / "m.onnx")
    result = optimize(src, tmp_path / "a.onnx", {"target_ratio": 1.5}, check=False)
    assert result.ratio >= 1.5
    (tmp_path / "plan.json").write_text(analyze_onnx(src, {"target_ratio": 1.5}).to_json())
    again = optimize(src, tmp_path / "b.onnx", plan=str(tmp_path / "plan.json"), check=False)
    assert again.params_after == result.params_after
    with pytest.raises(Exception, match="config: expected"):
        optimize(src, tmp_path / "c.onnx", 3)


# -- the property test ---------------------------------------------------------------------------------

_FLAGS = st.sampled_from([
    ["--ratio", "1.5"], ["--ratio", "2"], ["--ratio", "0"], ["--ratio", "nan"], ["--threshold", "0.1"],
    ["--metric", "cov"], ["--metric", "nope"], ["--merge", "mix"], ["--cross-role"], ["--max-group-size", "1"],
    ["--max-group-size", "3"], ["--seed", "-1"], ["--seed", "7"], ["--scope", "layers"], ["--max-overshoot", "0"],
    ["--dry-run"], ["--strict"], ["--no-validate"], ["--external-data"], ["--samples", "0"], ["--samples", "1"],
    ["--atol", "0"], ["--input-shape", "x:1x8"], ["--input-shape", "x:0x8"], ["--input-shape", "q:1"],
    ["--report", "{out}/r.json"], ["--report", "{src}"], ["--report", "{out}/o.onnx"], ["-o", "{out}/o.onnx"],
    ["-o", "{src}"], ["-o", "{out}/missing/o.onnx"], ["--plan", "{out}/plan.json"], ["--inputs", "{out}/in.npz"],
    ["--pipeline", "{out}/p.toml"], ["--explain"],
])
_FILES = st.sampled_from(["good", "truncated", "garbage", "empty", "bitflip"])


def _corrupt(data: bytes, how: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if how == "truncated":
        return data[: int(rng.integers(1, len(data)))]
    if how == "garbage":
        return rng.integers(0, 256, size=len(data) // 2, dtype=np.uint8).tobytes()
    if how == "empty":
        return b""
    if how == "bitflip":
        out = bytearray(data)
        for i in rng.integers(0, len(out), size=4):
            out[i] ^= 1 << int(rng.integers(0, 8))
        return bytes(out)
    return data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["optimize", "analyze", "validate"]), flags=st.lists(_FLAGS, max_size=4),
       how=_FILES, plan_how=_FILES, seed=st.integers(0, 2**16))
def test_cli_never_tracebacks_never_touches_inputs_never_leaves_strays(tmp_path_factory, capsys, command, flags,
                                                                         how, plan_how, seed):
    folder = tmp_path_factory.mktemp("prop")
    good = _mlp(folder / "good.onnx")
    src = folder / "m.onnx"
    src.write_bytes(_corrupt(good.read_bytes(), how, seed))
    plan = {"version": 1, "groups": []}
    (folder / "plan.json").write_bytes(_corrupt(json.dumps(plan).encode(), plan_how, seed))
    np.savez(folder / "in.npz", x=np.ones((1, W), np.float32))
    (folder / "p.toml").write_text("target_ratio = 1.5\n")
    good.unlink()
    inputs = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    argv = [command, str(src)] + ([str(src)] if command == "validate" else [])
    argv += [a.format(out=folder, src=src) for flag in flags for a in flag]
    if command != "optimize":
        argv = [a for a in argv if a not in ("--dry-run", "--strict", "--no-validate", "--external-data")]
    if command == "analyze":
        argv += ["--heatmap", str(folder / "h.png")]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), (argv, err)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.name in inputs} \
        == inputs, argv
    asked = {Path(a).name + ext for a in argv if a.startswith(str(folder)) for ext in ("", ".data")}
    asked |= {"m.fused.onnx", "m.fused.onnx.data"}
    strays = {p.name for p in folder.iterdir()} - set(inputs) - asked
    assert not strays, (argv, strays)


def test_an_initializer_without_a_data_type_is_a_corrupted_model(tmp_path, capsys):
    """Found by the property test: a bit flip that leaves a tensor's type UNDEFINED is refused on
    load, in one line, rather than failing wherever its size is first asked for."""
    good = _mlp(tmp_path / "good.onnx")
    model = onnx.load(str(good))
    model.graph.initializer[0].data_type = onnx.TensorProto.UNDEFINED
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    assert cli.main(["optimize", str(bad), "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert "has no valid data type" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()
