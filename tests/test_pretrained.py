"""A fused Hugging Face model saved by ``lfpass.save_pretrained`` and loaded back in a fresh
process by ``lfpass.load_pretrained``: the same unique-parameter count, bit-identical outputs,
a safetensors file no larger than its distinct tensors, the plan beside it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lfpass
from lfpass.core.plan import FusionPlan

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]

RELOAD = r"""
import json, sys, torch, lfpass
model = lfpass.load_pretrained(sys.argv[1])
ids = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(input_ids=ids).last_hidden_state
torch.save(out, sys.argv[3])
print(json.dumps({"unique": lfpass.unique_parameters(model), "class": type(model).__name__}))
"""


@pytest.fixture(scope="module")
def fused():
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    return (model, *lfpass.fuse(model, lfpass.FusionConfig(target_ratio=1.3, merge="mean")))


def _distinct_bytes(model) -> int:
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def test_a_fused_model_reloads_in_a_fresh_process_with_its_ties_bit_for_bit(fused, tmp_path):
    original, model, plan = fused
    assert plan.groups and lfpass.unique_parameters(model) < lfpass.unique_parameters(original)
    weights = lfpass.save_pretrained(model, tmp_path / "saved", plan)
    assert weights.stat().st_size <= _distinct_bytes(model) + 16 * 1024  # each shared tensor once (+ header)
    assert weights.stat().st_size < _distinct_bytes(original)
    assert FusionPlan.from_json((tmp_path / "saved" / "lfpass_plan.json").read_text()).params_after == plan.params_after
    ids = torch.randint(0, 120, (3, 10), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "saved"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, cwd=tmp_path, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures == {"unique": lfpass.unique_parameters(model), "class": "BertModel"}
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    assert torch.equal(torch.load(tmp_path / "out.pt"), want)  # bit for bit


def test_loading_into_a_model_of_other_names_is_one_line(fused, tmp_path):
    _, model, plan = fused
    lfpass.save_pretrained(model, tmp_path / "saved", plan)
    with pytest.raises(lfpass.InputError, match="does not match the save"):
        lfpass.load_pretrained(tmp_path / "saved", torch.nn.Linear(4, 4))
    with pytest.raises(lfpass.InputError, match="no model.safetensors"):
        lfpass.load_pretrained(tmp_path)


def test_a_sentence_transformer_fuses_and_encodes_through_its_usual_api(tmp_path):
    """Its Hugging Face model is fused in place of the original; ``encode`` runs as before, and
    the fused model saved and loaded back encodes bit for bit."""
    st = pytest.importorskip("sentence_transformers")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                   *(f"w{i}" for i in range(115))]) + "\n")
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    encoder = st.SentenceTransformer(str(tmp_path / "bert"), device="cpu")  # a plain model: mean pooling added
    sentences = [" ".join(f"w{(i * 7 + j) % 115}" for j in range(3 + i % 5)) for i in range(12)]
    before = encoder.encode(sentences, convert_to_tensor=True)
    original = encoder[0].model
    fused, plan = lfpass.fuse(original, lfpass.FusionConfig(target_ratio=1.3, merge="mean"))
    encoder[0].model = fused
    after = encoder.encode(sentences, convert_to_tensor=True)
    assert after.shape == before.shape and not torch.equal(after, before)  # the fused model is the one encoding
    assert lfpass.unique_parameters(encoder[0].model) == plan.params_after < lfpass.unique_parameters(original)
    lfpass.save_pretrained(fused, tmp_path / "fused", plan)
    encoder[0].model = lfpass.load_pretrained(tmp_path / "fused")
    assert torch.equal(encoder.encode(sentences, convert_to_tensor=True), after)
