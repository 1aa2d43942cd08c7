"""The house's floors: import-linter's contracts in pyproject.toml hold, and they catch a
planted violation (so the check is not one that cannot fail); the ONNX path imports no
torch, scipy or training stack."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("importlinter")


def _lint(root: Path, package_parent: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with ``root``'s pyproject, on the ``lfpass`` package under ``package_parent``."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(root / 'pyproject.toml')!r}, no_cache=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=package_parent, capture_output=True, text=True,
                          env={"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_the_floors_hold():
    run = _lint(ROOT, ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "BROKEN" not in run.stdout and run.stdout.count("KEPT") == 4


@pytest.mark.parametrize("module, line, contract", [
    ("core/sites.py", "import lfpass.cli", "floors"),                 # a lower floor importing a higher one
    ("core/metrics.py", "import torch", "the core knows no IR"),      # the core importing an IR
    ("onnx/names.py", "import lfpass.fx.sites", "floors"),           # one frontend importing the other
    ("core/sites.py", "import lfpass.core.plan", "no import circle"),  # a circle inside the core (plan imports sites)
])
def test_a_planted_violation_breaks_its_contract(tmp_path, module, line, contract):
    shutil.copytree(ROOT / "lfpass", tmp_path / "lfpass", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "lfpass" / module
    target.write_text(target.read_text() + f"\n{line}  # planted\n")
    run = _lint(ROOT, tmp_path)
    assert run.returncode != 0
    broken = [ln for ln in run.stdout.splitlines() if ln.endswith("BROKEN")]
    assert len(broken) >= 1 and any(ln.startswith(contract) for ln in broken), run.stdout[-3000:]


def test_the_onnx_path_imports_no_torch_scipy_or_training(tmp_path):
    """``lfpass optimize`` on a file: what the command imports, read in a fresh interpreter."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8])],
                              [numpy_helper.from_array(w, "w0"), numpy_helper.from_array(w + 1e-4, "w1")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code = ("import sys; from lfpass.cli import main; "
            f"rc = main(['optimize', {str(path)!r}, '--ratio', '1.5']); "
            "print(rc, *sorted(m for m in ('torch', 'scipy', 'lfpass.train', 'lfpass.fx', 'lfpass.bridge', "
            "'matplotlib', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    last = run.stdout.splitlines()[-1]
    assert last in ("0", "1"), f"exit code, then what was imported that the ONNX path must not: {last}"
    assert (tmp_path / "m.fused.onnx").exists()
