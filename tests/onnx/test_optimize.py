"""Models exported by both of torch's ONNX exporters (legacy ``dynamo=False`` and
``dynamo=True``): torchvision resnet18 and mobilenet_v2, tiny BERT and GPT-2 from
configs, and an MLP of near-copy blocks. For each: the sites and their roles, the
file shrinking by the shared bytes, onnx.checker and onnxruntime accepting the
output, and the validation numbers reported."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path

import onnx
import pytest
import torch

from lfpass.core.config import FusionConfig
from lfpass.onnx import find_sites, optimize
from lfpass.onnx.load import count_params, load_model
from lfpass.onnx.tied import lay_out_tables

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

LOSSY = FusionConfig(target_ratio=1.2)
NEAR_COPIES = FusionConfig(metric="euclidean", merge="mean", target_ratio=None, threshold=0.999)


class _Hidden(torch.nn.Module):
    """A Hugging Face model as ``(input_ids, attention_mask) -> first output``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)[0]


class _Blocks(torch.nn.Module):
    """Four blocks whose weights are block 0's plus 1e-6 noise (exporters merge exact copies)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
        with torch.no_grad():
            for b in self.blocks[1:]:
                b.weight.copy_(self.blocks[0].weight + 1e-6 * torch.randn_like(b.weight))
                b.bias.copy_(self.blocks[0].bias + 1e-6 * torch.randn_like(b.bias))

    def forward(self, x):
        return self.blocks(x)


def _models() -> dict[str, tuple[torch.nn.Module, tuple, dict]]:
    torch.manual_seed(0)
    image = (torch.randn(1, 3, 64, 64),)
    ids, mask = torch.randint(0, 100, (1, 8)), torch.ones(1, 8, dtype=torch.long)
    text = {"input_names": ["input_ids", "attention_mask"]}
    bert = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   vocab_size=100, max_position_embeddings=64)
    gpt2 = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64, use_cache=False,
                                   bos_token_id=0, eos_token_id=0)
    return {
        "resnet18": (torchvision.models.resnet18(), image, {}),
        "mobilenet_v2": (torchvision.models.mobilenet_v2(), image, {}),
        "bert": (_Hidden(transformers.BertModel(bert)), (ids, mask), text),
        "gpt2": (_Hidden(transformers.GPT2LMHeadModel(gpt2)), (ids, mask), text),
        "mlp": (_Blocks(), (torch.randn(2, 64),), {}),
    }


# role of one layer kind that repeats, per (model, exporter), and how many times it repeats
ROLES = {
    ("resnet18", "legacy"): ("layer1/layer1.*/conv1/Conv", 2),
    ("resnet18", "dynamo"): ("layer1.*.conv1", 2),
    ("mobilenet_v2", "legacy"): ("features/features.*/conv/conv.*/conv.*.*/Conv", 33),
    ("mobilenet_v2", "dynamo"): ("features.*.conv.*.*", 33),
    ("bert", "legacy"): ("model/encoder/layer.*/attention/self/query/MatMul", 2),
    ("bert", "dynamo"): ("model.encoder.layer.*.attention.self.query", 2),
    ("gpt2", "legacy"): ("model/transformer/h.*/attn/c_attn/Gemm", 2),
    ("gpt2", "dynamo"): ("model.transformer.h.*.attn.c_attn", 2),
    ("mlp", "legacy"): ("blocks/blocks.*/Gemm", 4),
    ("mlp", "dynamo"): ("blocks.*", 4),
}
CASES = sorted(ROLES)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[tuple[str, str], Path]:
    folder = tmp_path_factory.mktemp("exported")
    files = {}
    for name, (model, args, kwargs) in _models().items():
        model.eval()
        for exporter in ("legacy", "dynamo"):
            path = folder / f"{name}-{exporter}.onnx"
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, args, str(path), dynamo=exporter == "dynamo", external_data=False, **kwargs)
            files[name, exporter] = path
    return files


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_exported_model(exported, tmp_path, case):
    src = exported[case]
    role, count = ROLES[case]
    sites = find_sites(load_model(src)).sites
    assert sum(s.role == role for s in sites) == count, sorted({s.role for s in sites})
    assert len({s.name for s in sites}) == len(sites)

    config = NEAR_COPIES if case[0] == "mlp" else LOSSY
    out = tmp_path / "fused.onnx"
    result = optimize(src, out, config)
    assert result.written and result.plan.groups
    assert result.params_after < result.params_before
    onnx.checker.check_model(str(out), full_check=True)
    before, after = onnx.load(src, load_external_data=False), onnx.load(out, load_external_data=False)
    assert after.ir_version == before.ir_version
    assert {o.domain: o.version for o in after.opset_import} == {o.domain: o.version for o in before.opset_import}
    assert list(after.graph.input) == list(before.graph.input) and list(after.graph.output) == list(before.graph.output)

    saved_params = 4 * (result.params_before - result.params_after)  # float32 models
    assert result.bytes_before - result.bytes_after == pytest.approx(saved_params, rel=0.05)
    assert result.bytes_after == out.stat().st_size
    if case[0] in ("resnet18", "mobilenet_v2"):  # tensors are the whole file: the ratios agree too
        assert result.bytes_ratio == pytest.approx(result.ratio, rel=0.05)

    v = result.validation
    assert v is not None and v.error == "" and v.outputs  # onnxruntime ran the fused model
    for o in v.outputs:
        assert all(math.isfinite(x) for x in (o.max_abs, o.max_rel, o.cosine))
    report = result.to_dict()["validation"]
    assert set(report["outputs"][v.outputs[0].name]) >= {"max_abs", "max_rel", "cosine", "top1", "passed"}
    if case[0] == "mlp":  # near-copies: the merge moves outputs by about the noise
        assert v.passed and v.outputs[0].max_abs < 1e-4 and len(result.plan.groups) == 1
    if case[0] in ("resnet18", "gpt2"):
        assert all(o.top1 is not None for o in v.outputs)  # class scores
    laid_out = load_model(src)
    stored = count_params(laid_out)
    lay_out_tables(laid_out)
    twice = stored - count_params(laid_out)
    assert (twice > 0) == (case[0] == "gpt2")  # the tied table both exporters store transposed too
    assert result.params_after == result.plan.params_after - twice  # the plan's prediction, the tie written once
    if case[0] == "mlp":  # the four 64x64 blocks (weight and bias) share one
        assert (result.params_before, result.params_after) == (4 * (64 * 64 + 64), 64 * 64 + 64)
    else:
        assert result.ratio >= LOSSY.target_ratio
