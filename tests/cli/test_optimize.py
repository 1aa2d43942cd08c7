"""``lfpass optimize / analyze / validate`` on ONNX files: the happy paths, one test per
bad input (one line on stderr, the documented exit code, the input unchanged, no
half-written file), external data, and atomic output."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lfpass import cli
from lfpass.core.config import load_pipeline
from lfpass.core.errors import OutputError
from lfpass.onnx import optimize

WIDTH = 32
LOSSLESS = str(Path(__file__).parents[2] / "passes" / "lossless.toml")


def _mlp(path: Path, blocks: int = 6, weight_input: bool = False) -> Path:
    """Blocks ``i`` and ``i + 2`` are bit-identical (separate tensors); dynamic batch."""
    rng = np.random.default_rng(0)
    base = [rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.3 for _ in range(2)]
    nodes, inits, h = [], [], "x"
    for i in range(blocks):
        inits.append(numpy_helper.from_array(base[i % 2].copy(), f"blocks.{i}.weight"))
        nodes += [helper.make_node("MatMul", [h, f"blocks.{i}.weight"], [f"m{i}"], name=f"/blocks/blocks.{i}/MatMul"),
                  helper.make_node("Tanh", [f"m{i}"], [f"h{i}"])]
        h = f"h{i}"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("w_fed", TensorProto.FLOAT, [WIDTH, WIDTH]))
        nodes += [helper.make_node("MatMul", [h, "w_fed"], ["logits"], name="/head/MatMul")]
        h = "logits"
    outputs = [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["batch", WIDTH])]
    model = helper.make_model(helper.make_graph(nodes, "mlp", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


@pytest.fixture
def model(tmp_path) -> Path:
    return _mlp(tmp_path / "mlp.onnx")


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(capsys, *argv) -> tuple[int, str, list[str]]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.startswith("lfpass:")]


def _only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- happy paths --------------------------------------------------------------------------------

def test_optimize_lossless_prints_table_and_report(tmp_path, model, capsys):
    before = _hash(model)
    code, out, err = _run(capsys, "optimize", model, "--pipeline", LOSSLESS, "--report", tmp_path / "r.json")
    assert code == 0 and err == []
    fused = tmp_path / "mlp.fused.onnx"
    onnx.checker.check_model(str(fused), full_check=True)
    report = json.loads((tmp_path / "r.json").read_text())
    for key in ("ratio", "params_before", "params_after", "bytes_before", "bytes_after", "groups", "validation"):
        assert key in report
    assert report["groups"] == 2 and report["ratio"] == pytest.approx(3.0)
    assert report["validation"]["passed"] and report["validation"]["outputs"]["h5"]["max_abs"] == 0.0
    assert report["bytes_after"] == fused.stat().st_size
    for word in ("params", "bytes", "groups", "validation", "passed"):
        assert word in out
    assert _hash(model) == before


def test_plan_out_then_optimize_plan(tmp_path, model, capsys):
    plan = tmp_path / "plan.json"
    code, out, err = _run(capsys, "analyze", model, "--pipeline", LOSSLESS, "--plan-out", plan,
                          "--heatmap", tmp_path / "h.png")
    assert code == 0 and (tmp_path / "h.png").stat().st_size > 0
    groups = [g["members"] for g in json.loads(plan.read_text())["groups"]]
    code, out, err = _run(capsys, "optimize", model, "--plan", plan, "-o", tmp_path / "o.onnx", "--report",
                          tmp_path / "r.json")
    assert code == 0
    assert [g["members"] for g in json.loads((tmp_path / "r.json").read_text())["plan_groups"]] == groups


def test_analyze_explain_names_skipped_graph_input_weights(tmp_path, capsys):
    src = _mlp(tmp_path / "fed.onnx", weight_input=True)
    code, out, err = _run(capsys, "analyze", src, "--explain", "--heatmap", tmp_path / "h.png")
    assert code == 0
    assert "head/MatMul: weight 'w_fed' is a graph input" in out


def test_validate_command(tmp_path, model, capsys):
    assert _run(capsys, "validate", model, model)[0] == 0
    lossy = tmp_path / "lossy.onnx"
    assert _run(capsys, "optimize", model, "-o", lossy, "--ratio", "6", "--cross-role", "--no-validate")[0] == 0
    code, out, err = _run(capsys, "validate", model, lossy, "--report", tmp_path / "v.json")
    assert code == 1 and "FAILED" in out
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is False
    assert _run(capsys, "validate", model, lossy, "--atol", "1e9", "--rtol", "2")[0] == 0  # cosine needs 1 - rtol


def test_inputs_npz_and_input_shape(tmp_path, model, capsys):
    np.savez(tmp_path / "in.npz", x=np.ones((3, WIDTH), np.float32))
    args = ("optimize", model, "--pipeline", LOSSLESS, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert _run(capsys, *args, "--inputs", tmp_path / "in.npz")[0] == 0
    assert json.loads((tmp_path / "r.json").read_text())["validation"]["samples"] == 1
    assert _run(capsys, *args, "--input-shape", f"x:5x{WIDTH}", "--samples", "3")[0] == 0
    assert json.loads((tmp_path / "r.json").read_text())["validation"]["samples"] == 3
    code, _, err = _run(capsys, *args, "--input-shape", "x:5x7")
    assert code == 2 and f"fixed at {WIDTH}" in err[0]


def test_validation_failure_exits_1_and_marks_report_unless_strict(tmp_path, model, capsys):
    out = tmp_path / "o.onnx"
    args = ("optimize", model, "-o", out, "--ratio", "6", "--cross-role", "--report", tmp_path / "r.json")
    code, _, err = _run(capsys, *args)
    assert code == 1 and out.exists() and "validation outside tolerance" in err[-1]
    assert json.loads((tmp_path / "r.json").read_text())["validation"]["passed"] is False
    out.unlink()
    code, _, err = _run(capsys, *args, "--strict")
    assert code == 1 and not out.exists() and len(err) == 1
    assert json.loads((tmp_path / "r.json").read_text())["written"] is False
    assert not [n for n in _only(tmp_path) if n.startswith(".")]


def test_dry_run_writes_nothing(tmp_path, model, capsys):
    code, out, err = _run(capsys, "optimize", model, "--pipeline", LOSSLESS, "--dry-run")
    assert code == 0 and "predicted" in out
    assert _only(tmp_path) == ["mlp.onnx"]


def test_external_data_in_and_out(tmp_path, capsys):
    src = tmp_path / "ext.onnx"
    proto = onnx.load(_mlp(tmp_path / "inline.onnx"))
    onnx.save(proto, src, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=0)
    hashes = (_hash(src), _hash(tmp_path / "ext.onnx.data"))
    out = tmp_path / "out" / "fused.onnx"
    out.parent.mkdir()
    code, _, err = _run(capsys, "optimize", src, "-o", out, "--pipeline", LOSSLESS, "--report", tmp_path / "r.json")
    assert code == 0, err
    assert _only(out.parent) == ["fused.onnx", "fused.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)
    fused = onnx.load(out, load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in fused.graph.initializer)
    report = json.loads((tmp_path / "r.json").read_text())
    saved = 4 * (report["params_before"] - report["params_after"])
    assert report["bytes_before"] - report["bytes_after"] == pytest.approx(saved, rel=0.05)
    assert report["validation"]["passed"]
    assert (_hash(src), _hash(tmp_path / "ext.onnx.data")) == hashes
    back = optimize(src, tmp_path / "inline-again.onnx", load_pipeline(LOSSLESS), external_data=False)
    assert back.validation.passed and not (tmp_path / "inline-again.onnx.data").exists()
    onnx.checker.check_model(str(tmp_path / "inline-again.onnx"), full_check=True)
    inline_out = tmp_path / "forced.onnx"  # and an inline model can be forced into external form
    assert _run(capsys, "optimize", tmp_path / "inline.onnx", "-o", inline_out, "--pipeline", LOSSLESS,
                "--external-data")[0] == 0
    assert (tmp_path / "forced.onnx.data").exists()


@pytest.mark.parametrize("external", [False, True])
def test_output_is_atomic_when_writing_fails(tmp_path, model, monkeypatch, external):
    import lfpass.onnx.save as save

    def broken(proto, path, *args, **kwargs):
        Path(path).write_bytes(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(save.onnx, "save", broken)
    with pytest.raises(OutputError, match="No space left"):
        optimize(model, tmp_path / "o.onnx", check=False, external_data=external)
    assert _only(tmp_path) == ["mlp.onnx"]


# -- bad input: one line on stderr, exit 2 (0 where nothing is wrong), input untouched ----------

def _bad(capsys, tmp_path, *argv, code=2, says=""):
    files = {p: _hash(p) for p in tmp_path.iterdir() if p.is_file()}
    got, out, err = _run(capsys, *argv)
    assert got == code
    assert len(err) == 1, err
    assert says in err[0]
    assert {p: _hash(p) for p in files} == files
    assert not [n for n in _only(tmp_path) if n.startswith(".") or n.endswith(".fused.onnx")]
    return err[0]


def test_missing_file(tmp_path, capsys):
    _bad(capsys, tmp_path, "optimize", tmp_path / "nope.onnx", says="no such file")


def test_not_onnx(tmp_path, capsys):
    (tmp_path / "notes.onnx").write_text("these are not the weights you are looking for\n" * 20)
    _bad(capsys, tmp_path, "optimize", tmp_path / "notes.onnx", says="not an ONNX model")


def test_truncated_file(tmp_path, model, capsys):
    data = model.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    _bad(capsys, tmp_path, "optimize", cut, says="truncated")


def test_empty_graph(tmp_path, capsys):
    empty = helper.make_model(helper.make_graph([], "empty", [], []), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(empty, tmp_path / "empty.onnx")
    _bad(capsys, tmp_path, "optimize", tmp_path / "empty.onnx", says="graph is empty")


def test_nothing_fusable(tmp_path, capsys):
    src = _mlp(tmp_path / "one.onnx", blocks=1)
    _bad(capsys, tmp_path, "optimize", src, code=0, says="nothing to fuse")
    assert _only(tmp_path) == ["one.onnx"]


@pytest.mark.parametrize("ratio", ["0.99", "0.5", "-2", "nan", "inf"])
def test_invalid_ratio(tmp_path, model, capsys, ratio):
    _bad(capsys, tmp_path, "optimize", model, "--ratio", ratio, says="target_ratio")


def test_a_ratio_of_1_fuses_nothing(tmp_path, model, capsys):
    """``--ratio 1`` is how ``--quantize`` runs alone; without it there is nothing to write."""
    code, _, err = _run(capsys, "optimize", model, "--ratio", "1", "-o", tmp_path / "o.onnx")
    assert code == 0 and any("nothing to fuse" in line for line in err) and not (tmp_path / "o.onnx").exists()


def test_unreachable_ratio_fuses_what_it_can(tmp_path, model, capsys):
    code, out, err = _run(capsys, "optimize", model, "--ratio", "50", "--no-validate", "--report", tmp_path / "r.json")
    assert code == 0 and len(err) == 1
    assert "out of reach" in err[0] and "reaching 6.000" in err[0]
    assert json.loads((tmp_path / "r.json").read_text())["ratio"] == pytest.approx(6.0)


def test_unwritable_output(tmp_path, model, capsys):
    _bad(capsys, tmp_path, "optimize", model, "-o", tmp_path / "missing" / "o.onnx", says="does not exist")
    (tmp_path / "adir").mkdir()
    _bad(capsys, tmp_path, "optimize", model, "-o", tmp_path / "adir", says="is a folder")


def test_output_equal_to_input(tmp_path, model, capsys, monkeypatch):
    _bad(capsys, tmp_path, "optimize", model, "-o", model, says="would overwrite the input")
    monkeypatch.chdir(tmp_path)
    _bad(capsys, tmp_path, "optimize", "mlp.onnx", "-o", f"{tmp_path}/./mlp.onnx", says="would overwrite the input")


@pytest.mark.parametrize("flag,value", [("--metric", "pearson"), ("--merge", "median")])
def test_unknown_metric_or_merge_rule(tmp_path, model, capsys, flag, value):
    _bad(capsys, tmp_path, "optimize", model, flag, value, says="unknown")


def test_bad_plan_file(tmp_path, model, capsys):
    (tmp_path / "plan.json").write_text("{not json")
    _bad(capsys, tmp_path, "optimize", model, "--plan", tmp_path / "plan.json", says="not a valid lfpass plan")


def test_plan_with_options_that_would_change_it_is_refused(tmp_path, model, capsys):
    plan = tmp_path / "plan.json"
    assert _run(capsys, "analyze", model, "--ratio", "1.5", "--plan-out", plan)[0] == 0
    for flags in (["--merge", "regmean"], ["--ratio", "3"], ["--align", "weights"]):
        code, out, err = _run(capsys, "optimize", model, "--plan", plan, "-o", tmp_path / "o.onnx", *flags)
        assert code == 2 and len(err) == 1 and "would be ignored" in err[0], err
        assert not (tmp_path / "o.onnx").exists()
    assert _run(capsys, "optimize", model, "--plan", plan, "-o", tmp_path / "o.onnx")[0] in (0, 1)


def test_keep_function_options_without_a_budget_are_validated(tmp_path, model, capsys):
    """Alignment alone (no --max-error) changes outputs: the written file is compared with the
    input like any other, and a file outside the tolerances exits 1."""
    out = tmp_path / "aligned.onnx"
    code, text, err = _run(capsys, "optimize", model, "-o", out, "--align", "weights", "--ratio", "6", "--cross-role")
    assert out.exists() and "validation" in text + " ".join(err)
    assert code == 1 and any("validation outside tolerance" in e for e in err), err


def test_with_inputs_auto_becomes_the_data_aware_options_and_the_report_says_so(tmp_path, model, capsys):
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((32, WIDTH)).astype(np.float32))
    report = tmp_path / "r.json"
    code, _, err = _run(capsys, "optimize", model, "-o", tmp_path / "o.onnx", "--inputs", tmp_path / "c.npz",
                        "--ratio", "1.5", "--report", report)
    data = json.loads(report.read_text())
    menu = "tie,residual,basis,lowrank"
    assert code in (0, 1) and data["defaults"] == {"merge": "regmean", "align": "none", "actions": menu}
    assert data["align"] == "none" and (data["plan_factors"] or data["plan_groups"])  # the menu's ties align not
    assert any(f"by default: merge regmean, align none, actions {menu}" in line for line in err)
    code, _, err = _run(capsys, "optimize", model, "-o", tmp_path / "t.onnx", "--inputs", tmp_path / "c.npz",
                        "--ratio", "1.5", "--actions", "tie", "--report", report)
    data = json.loads(report.read_text())
    assert data["defaults"] == {"merge": "regmean", "align": "weights"} and not data["plan_factors"]
    assert (data["merge"], data["align"]) == ("regmean", "weights")
    code, _, err = _run(capsys, "optimize", model, "-o", tmp_path / "p.onnx", "--inputs", tmp_path / "c.npz",
                        "--ratio", "1.5", "--merge", "mean", "--align", "none", "--actions", "tie",
                        "--report", report)
    data = json.loads(report.read_text())
    assert data["defaults"] == {} and (data["merge"], data["align"]) == ("mean", "none")


@pytest.mark.parametrize("flag, value", [("--pooling", "mean"), ("--error-output", "y"), ("--margin", "0")])
def test_how_an_error_is_measured_needs_inputs(tmp_path, model, capsys, flag, value):
    code, _, err = _run(capsys, "optimize", model, "--ratio", "1.5", flag, value, "-o", tmp_path / "o.onnx")
    assert code == 2 and len(err) == 1 and "give --inputs" in err[0] and not (tmp_path / "o.onnx").exists()


def test_actions_are_checked_and_analyze_sends_the_menu_to_optimize(tmp_path, model, capsys):
    code, _, err = _run(capsys, "optimize", model, "--ratio", "1.5", "--actions", "tie,bases", "-o", tmp_path / "o.onnx")
    assert code == 2 and len(err) == 1 and "actions: unknown 'bases'" in err[0] and not (tmp_path / "o.onnx").exists()
    code, _, err = _run(capsys, "analyze", model, "--ratio", "1.5", "--actions", "basis")
    assert code == 2 and len(err) == 1 and "--dry-run" in err[0]
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((32, WIDTH)).astype(np.float32))
    code, out, err = _run(capsys, "optimize", model, "--inputs", tmp_path / "c.npz", "--ratio", "1.5",
                          "--actions", "basis,lowrank", "--dry-run", "--explain")
    assert code == 0 and any(line.startswith("factored") for line in out.splitlines()), out
