"""Nothing lost: no write lands on an input, a model and its data file are never left
mismatched (fault injection: the writer killed before each file operation), and
SIGTERM cleans up as SIGINT does."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lfpass import cli

WIDTH = 16


def _model(path: Path, external: bool = False, blocks: int = 4, seed: int = 0) -> Path:
    """An MLP whose blocks are near-copies in pairs (so a ratio-2 plan merges them)."""
    rng = np.random.default_rng(seed)
    base = [rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) for _ in range(2)]
    nodes, inits, h = [], [], "x"
    for i in range(blocks):
        w = base[i % 2] + 0.01 * rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"blocks.{i}.weight"))
        nodes += [helper.make_node("MatMul", [h, f"blocks.{i}.weight"], [f"m{i}"], name=f"/blocks.{i}/MatMul"),
                  helper.make_node("Tanh", [f"m{i}"], [f"h{i}"])]
        h = f"h{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        onnx.save(model, path, save_as_external_data=True, location=f"{path.name}.data", size_threshold=0)
    else:
        onnx.save(model, path)
    return path


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _run(capsys, *argv) -> tuple[int, list[str]]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.strip()]


# -- item 1: no write lands on an input ----------------------------------------------------------

def _refused(capsys, folder: Path, *argv, says: str = "would overwrite") -> None:
    before = _hashes(folder)
    code, err = _run(capsys, *argv)
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert _hashes(folder) == before  # nothing written, nothing changed


@pytest.mark.parametrize("dry", [False, True])
def test_report_cannot_overwrite_the_model(tmp_path, capsys, dry):
    src = _model(tmp_path / "m.onnx")
    _refused(capsys, tmp_path, "optimize", src, "--report", src, *(["--dry-run"] if dry else []))


def test_report_equal_to_output_is_refused(tmp_path, capsys):
    src = _model(tmp_path / "m.onnx")
    _refused(capsys, tmp_path, "optimize", src, "-o", tmp_path / "o.onnx", "--report", tmp_path / "o.onnx",
             says="name the same file")


def test_analyze_outputs_cannot_overwrite_model_or_each_other(tmp_path, capsys):
    src = _model(tmp_path / "m.onnx")
    _refused(capsys, tmp_path, "analyze", src, "--plan-out", src, "--heatmap", tmp_path / "h.png")
    _refused(capsys, tmp_path, "analyze", src, "--heatmap", src)
    _refused(capsys, tmp_path, "analyze", src, "--heatmap", tmp_path / "x", "--plan-out", tmp_path / "x",
             says="name the same file")


def test_validate_report_cannot_overwrite_a_model(tmp_path, capsys):
    src = _model(tmp_path / "m.onnx")
    _refused(capsys, tmp_path, "validate", src, src, "--report", src)


def test_outputs_cannot_reach_inputs_by_symlink_hard_link_or_dotdot(tmp_path, capsys):
    src = _model(tmp_path / "m.onnx")
    (tmp_path / "sub").mkdir()
    os.symlink(src, tmp_path / "link.onnx")
    os.link(src, tmp_path / "hard.onnx")
    for alias in (tmp_path / "link.onnx", tmp_path / "hard.onnx", tmp_path / "sub" / ".." / "m.onnx"):
        _refused(capsys, tmp_path, "optimize", src, "--report", alias)
        _refused(capsys, tmp_path, "optimize", src, "-o", alias)


def test_outputs_cannot_overwrite_the_external_data_plan_or_pipeline(tmp_path, capsys):
    src = _model(tmp_path / "m.onnx", external=True)
    _refused(capsys, tmp_path, "optimize", src, "--report", tmp_path / "m.onnx.data")
    _refused(capsys, tmp_path, "optimize", src, "-o", tmp_path / "m.onnx.data")
    pipeline = tmp_path / "p.toml"
    pipeline.write_text("target_ratio = 1.5\n")
    _refused(capsys, tmp_path, "optimize", src, "--pipeline", pipeline, "--report", pipeline)
    _refused(capsys, tmp_path, "validate", src, src, "--report", tmp_path / "m.onnx.data")


def test_report_in_missing_folder_fails_before_anything_is_written(tmp_path, capsys):
    src = _model(tmp_path / "m.onnx")
    _refused(capsys, tmp_path, "optimize", src, "--ratio", "1.5", "--report", tmp_path / "no" / "r.json",
             says="does not exist")
    (tmp_path / "adir").mkdir()
    _refused(capsys, tmp_path, "optimize", src, "--report", tmp_path / "adir", says="is a folder")


def test_failed_validation_still_writes_its_report(tmp_path, capsys):
    src = _model(tmp_path / "m.onnx")
    code, err = _run(capsys, "optimize", src, "--ratio", "2", "--atol", "0", "--rtol", "0", "--report",
                     tmp_path / "r.json")
    assert code == 1 and (tmp_path / "r.json").exists()


# -- item 2: a model and its data file are never mismatched ------------------------------------------

_KILLER = textwrap.dedent("""
    import builtins, os, sys
    kill_at, count = int(sys.argv[1]), [0]

    def point():
        count[0] += 1
        if count[0] == kill_at:
            os._exit(137)

    def wrap(fn):
        def wrapped(*args, **kwargs):
            point()
            return fn(*args, **kwargs)
        return wrapped

    for name in ("replace", "rename", "unlink", "remove", "rmdir", "fsync", "chmod", "mkdir"):
        setattr(os, name, wrap(getattr(os, name)))
    real_open, real_os_open = builtins.open, os.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            point()
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            point()
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open, os.open = open_, os_open
    from lfpass import cli
    code = cli.main(sys.argv[2:])
    sys.stdout.flush()
    os._exit(200 + code)  # reached the end: no kill point left
""")


def _weights(path: Path) -> dict[str, bytes]:
    """The model's initializers, with external data read through the model's references."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def test_killed_writer_never_leaves_the_model_and_its_data_mismatched(tmp_path):
    (tmp_path / "in").mkdir()
    src = _model(tmp_path / "in" / "m.onnx", external=True)
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    for folder, ratio in ((old_dir, "1.2"), (new_dir, "2")):
        folder.mkdir()
        code = cli.main(["optimize", str(src), "-o", str(folder / "out.onnx"), "--ratio", ratio, "--no-validate"])
        assert code in (0, 1)
    old, new = _weights(old_dir / "out.onnx"), _weights(new_dir / "out.onnx")
    assert old != new
    inputs = _hashes(src.parent)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    outcomes = []
    for kill_at in range(1, 200):
        work = tmp_path / f"k{kill_at}"
        shutil.copytree(old_dir, work)
        argv = ["optimize", str(src), "-o", str(work / "out.onnx"), "--ratio", "2"]
        proc = subprocess.run([sys.executable, "-c", _KILLER, str(kill_at), *argv], env=env, capture_output=True,
                              text=True, timeout=120)
        assert "Traceback" not in proc.stderr, proc.stderr
        got = _weights(work / "out.onnx")  # whatever happened, the pair loads ...
        assert got in (old, new), f"killed at point {kill_at}: the model reads weights of neither run"
        assert _hashes(src.parent) == inputs
        assert not [p for p in work.iterdir() if p.is_dir()], "a staging folder was left behind"
        outcomes.append(got == new)
        if proc.returncode != 137:  # the run finished before this point
            assert proc.returncode in (200, 201), proc.stderr
            assert got == new
            referenced = {"out.onnx"} | {e.value for t in onnx.load(work / "out.onnx", load_external_data=False)
                                         .graph.initializer for e in t.external_data if e.key == "location"}
            assert {p.name for p in work.iterdir()} == referenced, "the old data file or a temp file was left"
            break
        shutil.rmtree(work)
    else:
        pytest.fail("the writer never finished")
    assert len(outcomes) > 5 and not outcomes[0] and outcomes[-1]  # killed early: old; at the end: new


def test_sigterm_cleans_temporary_files_like_sigint(tmp_path, capsys, monkeypatch):
    import lfpass.onnx.save as save

    src = _model(tmp_path / "m.onnx", external=True)
    real = save.write

    def write_then_term(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(sys.modules["lfpass.onnx.optimize"], "write", write_then_term)
    before = _hashes(tmp_path)
    code, err = _run(capsys, "optimize", src, "-o", tmp_path / "o.onnx", "--ratio", "2")
    assert code == 143 and "terminated" in err[-1]
    assert _hashes(tmp_path) == before  # no model, no data file, no temp file
