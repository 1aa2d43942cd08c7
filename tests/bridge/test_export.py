"""lfpass.export: a fused model to ONNX with every tie kept, checked in onnxruntime.

Each export test asserts the four things: which exporter ran; the structure
(each tensor shared in PyTorch stored once, read straight from the file; the
float elements stored against the model's parameters and buffers; the nodes
BatchNorm leaves); onnxruntime against PyTorch on inputs the export never saw,
within 1e-4 of the output scale (float32 round-off on these sizes is ~1e-6);
and a negative case (the unfused model has nothing to share, so its BatchNorms
fold; without the guard the GPT-2 head's transposed copy comes back)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

import lfpass
import lfpass.bridge.export as onnx_export
from lfpass.bridge.export import Agreement, DeduplicateTensorsPass, agreement
from lfpass.core.errors import OutputError, TraceError, ValidationFailed
from lfpass.demo.cnn import build_cnn
from lfpass.onnx.validate import run

WIDTH = 40  # 1,600-element weights: past the 1,024 up to which exporters merge equal tensors themselves
TOLERANCE = 1e-4


class Blocks(nn.Module):
    """An MLP of ``depth`` same-shaped blocks between an input layer and a head."""

    def __init__(self, depth: int = 6, width: int = WIDTH):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def _shared(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters reached under two or more names, by their first name."""
    names: dict[int, list[str]] = {}
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    return {found[0]: params[key] for key, found in names.items() if len(found) > 1}


def _initializers(path: Path) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]


def _stored(path: Path, tensor: torch.Tensor) -> int:
    """How many initializers of the file hold ``tensor``'s values (its own layout or transposed)."""
    want = tensor.detach().numpy()
    layouts = [want] + ([want.T] if want.ndim == 2 else [])
    return sum(any(a.shape == w.shape and np.array_equal(a, w) for w in layouts) for a in _initializers(path))


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _agrees(path: Path, model: nn.Module, *args: torch.Tensor) -> float:
    """Max abs error of the file against ``model`` (eval mode) on ``args``, in units of the output scale."""
    names = [i.name for i in onnx.load(str(path)).graph.input]
    got = list(run(path, [{n: a.numpy() for n, a in zip(names, args)}])[0].values())[0]
    training = model.training
    with torch.no_grad():
        expected = model.eval()(*args)
        expected = (expected.logits if hasattr(expected, "logits") else expected).numpy()
    model.train(training)
    return float(np.abs(got - expected).max() / max(1.0, np.abs(expected).max()))


@pytest.fixture
def fused_mlp() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = Blocks().eval()
    fused, plan = lfpass.fuse(model, target_ratio=2)
    assert plan.groups
    return model, fused


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_mlp_shared_weights_are_stored_once(tmp_path, fused_mlp, dynamo):
    model, fused = fused_mlp
    shared = _shared(fused)
    result = lfpass.export(fused, torch.randn(4, 8), tmp_path / "mlp.onnx", dynamo=dynamo)

    assert result.exporter == ("dynamo" if dynamo else "legacy") and result.fallback_reason == ""
    assert result.shared == result.ties_kept == len(shared) > 0
    assert all(_stored(result.path, p) == 1 for p in shared.values())
    assert result.params_onnx == result.params_torch == lfpass.unique_parameters(fused)  # nothing folds, no buffers
    assert result.buffers_torch == 0 and result.bytes == result.path.stat().st_size
    assert Path(__file__).parent.as_posix().encode() not in result.path.read_bytes()  # no stack traces kept
    assert result.passed and result.max_abs <= TOLERANCE * result.scale
    assert _agrees(result.path, fused, torch.randn(4, 8)) <= TOLERANCE

    unfused = lfpass.export(model, torch.randn(4, 8), tmp_path / "unfused.onnx", dynamo=dynamo)
    assert unfused.shared == 0 and unfused.params_onnx == lfpass.unique_parameters(model)
    saved = unfused.bytes - result.bytes  # each parameter shared away takes its 4 bytes (and a name) with it
    assert 4 * (unfused.params_onnx - result.params_onnx) <= saved <= 4.1 * (unfused.params_onnx - result.params_onnx)


def _cnn_with_statistics() -> nn.Module:
    """The demo CNN with BatchNorm scales and statistics that differ per layer (as after
    training), so a BatchNorm folded into a shared conv would give each layer its own weight."""
    model = build_cnn(seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            for t, low, high in ((bn.weight, 0.5, 1.5), (bn.bias, -0.2, 0.2), (bn.running_mean, -0.5, 0.5),
                                 (bn.running_var, 0.5, 2.0)):
                t.copy_(torch.empty(t.shape).uniform_(low, high, generator=gen))
    return model


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_cnn_shared_convs_keep_batchnorm_beside_them(tmp_path, dynamo):
    model = _cnn_with_statistics()
    fused, plan = lfpass.fuse(model, target_ratio=2)
    fused.train()  # export runs it in eval mode and gives its mode back
    in_groups = sum(len(g.members) for g in plan.groups)
    result = lfpass.export(fused, torch.randn(4, 1, 28, 28), tmp_path / "cnn.onnx", dynamo=dynamo,
                           dynamic_shapes=({0: "batch"},), input_names=["x"])

    assert fused.training and all(m.training for m in fused.modules())
    shared = _shared(fused)
    assert result.shared == result.ties_kept == len(shared) == len(plan.groups)
    assert all(_stored(result.path, p) == 1 for p in shared.values())
    block_weights = [a for a in _initializers(result.path) if a.shape == (32, 32, 3, 3)]
    assert len(block_weights) == len(plan.groups) + 7 - in_groups
    ops = _ops(result.path)
    assert ops.count("BatchNormalization") == in_groups and ops.count("Conv") == 8  # only unshared BNs fold
    # the stem's BatchNorm (4 vectors of 32) folds into one conv bias
    assert result.params_onnx == result.params_torch + result.buffers_torch - 3 * 32
    assert result.passed and result.max_abs <= TOLERANCE * result.scale
    assert _agrees(result.path, fused, torch.randn(7, 1, 28, 28)) <= TOLERANCE  # another batch size

    unfused = lfpass.export(model, torch.randn(4, 1, 28, 28), tmp_path / "unfused.onnx", dynamo=dynamo)
    assert "BatchNormalization" not in _ops(unfused.path) and unfused.shared == 0  # nothing shared: all fold


def _tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and norms start constant; make each tensor its own
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn(p.shape))
    return model


@pytest.fixture
def fused_gpt2() -> nn.Module:
    model = _tiny_gpt2()
    fused, plan = lfpass.fuse(model, target_ratio=1.3)
    assert plan.groups
    return fused


def test_gpt2_fused_and_tied_embedding_stored_once(tmp_path, fused_gpt2):
    shared = _shared(fused_gpt2)
    assert fused_gpt2.lm_head.weight is fused_gpt2.transformer.wte.weight
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    result = lfpass.export(fused_gpt2, ids, tmp_path / "gpt2.onnx")

    assert result.exporter == "dynamo"
    assert "transformer.wte.weight" in shared and result.shared == result.ties_kept == len(shared) >= 3
    assert all(_stored(result.path, p) == 1 for p in shared.values())
    embeddings = [a for a in _initializers(result.path) if sorted(a.shape) == [32, 100]]
    assert len(embeddings) == 1  # the LM head reads the embedding through a Transpose node
    assert result.passed and result.max_abs <= TOLERANCE * result.scale
    assert _agrees(result.path, fused_gpt2, torch.randint(0, 100, (2, 8))) <= TOLERANCE


def test_a_broken_tie_fails_the_export(tmp_path, fused_gpt2, monkeypatch):
    """Without the guard, onnxscript folds the head's Transpose(wte) into a second copy."""
    monkeypatch.setattr(onnx_export, "_folds_a_copy", lambda node: None)
    out = tmp_path / "gpt2.onnx"
    with pytest.raises(ValidationFailed, match=r"broke a tie: transformer\.wte\.weight.* stored 2 times"):
        lfpass.export(fused_gpt2, torch.randint(0, 100, (2, 8)), out)
    assert list(tmp_path.iterdir()) == []


def _refuse_dynamo(monkeypatch, legacy_error: str | None = None) -> None:
    real = torch.onnx.export

    def export(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo says no\n(a long report follows)")
        if legacy_error:
            raise RuntimeError(legacy_error)
        return real(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)


def test_a_failing_dynamo_export_falls_back_to_legacy(tmp_path, fused_mlp, monkeypatch, caplog):
    _refuse_dynamo(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="lfpass.bridge.export"):
        result = lfpass.export(fused_mlp[1], torch.randn(4, 8), tmp_path / "mlp.onnx")
    assert result.exporter == "legacy" and result.opset == 17
    assert result.fallback_reason == "RuntimeError: dynamo says no"
    assert "falling back to the legacy exporter" in caplog.text
    assert result.passed and result.ties_kept == result.shared > 0


def test_both_exporters_failing_is_one_line_naming_both(tmp_path, fused_mlp, monkeypatch):
    _refuse_dynamo(monkeypatch, legacy_error="legacy says no\nmore lines")
    with pytest.raises(TraceError) as caught:
        lfpass.export(fused_mlp[1], torch.randn(4, 8), tmp_path / "mlp.onnx")
    message = str(caught.value)
    assert "\n" not in message
    assert "dynamo exporter failed (RuntimeError: dynamo says no)" in message
    assert "legacy exporter failed too (RuntimeError: legacy says no)" in message
    assert list(tmp_path.iterdir()) == []  # no file, no scratch folder


def _corrupting_keep_ties(monkeypatch) -> None:
    real = onnx_export.keep_ties

    def keep_ties(model):
        real(model)
        head = next(v for v in model.graph.initializers.values() if v.const_value.shape == (3,))
        head.const_value = onnx_export.ir.tensor(head.const_value.numpy() + 0.5)

    monkeypatch.setattr(onnx_export, "keep_ties", keep_ties)


def test_check_catches_a_wrong_export_and_writes_nothing(tmp_path, fused_mlp, monkeypatch):
    _corrupting_keep_ties(monkeypatch)
    out = tmp_path / "mlp.onnx"
    out.write_bytes(b"an older file")
    with pytest.raises(ValidationFailed, match=r"max abs error 0\.5 > 0\.0001 x output scale") as caught:
        lfpass.export(fused_mlp[1], torch.randn(4, 8), out)
    assert caught.value.result.passed is False
    assert out.read_bytes() == b"an older file" and sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]

    unchecked = lfpass.export(fused_mlp[1], torch.randn(4, 8), out, check=False)
    assert unchecked.passed is None and unchecked.max_abs is None
    assert _agrees(out, fused_mlp[1], torch.randn(4, 8)) > TOLERANCE  # the wrong file, kept as asked


def test_external_data_lands_beside_the_model(tmp_path, fused_mlp):
    result = lfpass.export(fused_mlp[1], torch.randn(4, 8), tmp_path / "mlp.onnx", external_data=True)
    data = tmp_path / "mlp.onnx.data"
    assert data.is_file() and result.bytes == result.path.stat().st_size + data.stat().st_size
    assert result.passed and all(_stored(result.path, p) == 1 for p in _shared(fused_mlp[1]).values())


def test_output_folder_must_exist(tmp_path, fused_mlp):
    with pytest.raises(OutputError, match="does not exist"):
        lfpass.export(fused_mlp[1], torch.randn(4, 8), tmp_path / "missing" / "mlp.onnx")


def test_agreement_is_measured_against_the_output_scale():
    big, small = np.array([[10.0, -2.0]]), np.array([[1e-3, 0.0]])
    assert agreement([big], [big + [[1.0, 0.0]]], ["y"], 0.1).passed  # 1 <= 0.1 x 10
    failed = agreement([big], [big + [[1.5, 0.0]]], ["y"], 0.1)
    assert not failed.passed and failed.max_abs == 1.5 and failed.scale == 10.0 and failed.reason == "output y"
    assert agreement([small], [small + 5e-4], ["y"], 1e-3).passed  # the scale is at least 1
    assert not agreement([small], [small + 2e-3], ["y"], 1e-3).passed


def test_agreement_refuses_what_cannot_be_compared():
    y = np.ones((2, 3), np.float32)
    assert agreement([y], [y], ["y"], 1e-4) == Agreement(True, 0.0, 1.0, "")
    assert "shape" in agreement([y], [y[:1]], ["y"], 1e-4).reason
    assert "NaN" in agreement([y], [np.where(y > 0, np.nan, y)], ["y"], 1e-4).reason
    assert "outputs" in agreement([y, y], [y], ["y"], 1e-4).reason
    ints = np.arange(3)
    assert agreement([ints], [ints], ["i"], 1e-4).passed and not agreement([ints], [ints + 1], ["i"], 1e-4).passed


def _matmuls(*weights: np.ndarray) -> onnx.ModelProto:
    """``y_i = x @ w_i`` for each weight, as initializers ``w0``, ``w1``, ..."""
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(len(weights))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, [1, 64]) for i in range(len(weights))],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_deduplicate_merges_exact_copies_of_any_size():
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    nudged = w.copy()
    nudged[5, 5] = np.nextafter(w[5, 5], np.float32(np.inf))  # one ulp: not a copy
    model = onnx_export.ir.serde.deserialize_model(_matmuls(w, w.copy(), nudged))
    result = DeduplicateTensorsPass()(model)
    assert result.modified and sorted(model.graph.initializers) == ["w0", "w2"]
    assert [n.inputs[1].name for n in model.graph] == ["w0", "w0", "w2"]
    assert not DeduplicateTensorsPass()(model).modified  # nothing left to merge


def test_deduplicate_keys_any_layout_where_onnx_irs_own_pass_raises():
    """Why the pass overrides onnx-ir's ``call``: a folded Transpose leaves a non-contiguous
    array, whose buffer onnx-ir's hashed pass cannot hash. When that passes, drop the override."""
    from onnx_ir.passes.common import DeduplicateHashedInitializersPass

    w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)

    def model_with_views():
        m = onnx_export.ir.serde.deserialize_model(_matmuls(w.T.copy(), w.T.copy()))
        for v in m.graph.initializers.values():
            v.const_value = onnx_export.ir.tensor(w.T, name=v.name)  # a transposed view, as folding leaves
        return m

    with pytest.raises(ValueError, match="contiguous"):
        DeduplicateHashedInitializersPass()(model_with_views())
    model = model_with_views()
    assert DeduplicateTensorsPass()(model).modified and sorted(model.graph.initializers) == ["w0"]


def test_empty_buffers_are_no_tie(tmp_path):
    """Zero-element buffers (onnx2torch keeps a Resize's empty roi so) all sit at storage address 0:
    they are not one tensor under several names, and the export's tie check skips them."""
    from lfpass.bridge.export import shared_tensors

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.register_buffer("roi_a", torch.empty(0))
            self.register_buffer("roi_b", torch.empty(0))

        def forward(self, x):
            return self.fc(x) + self.roi_a.sum() + self.roi_b.sum()

    model = Net().eval()
    assert shared_tensors(model) == {}
    result = lfpass.export(model, torch.randn(2, 4), tmp_path / "e.onnx")
    assert result.max_abs < 1e-5
