"""Calibration statistics from the FX (hooks and Interpreter) and ONNX (onnxruntime) frontends."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lfpass.core.calibration import CalibrationError
from lfpass.fx.calibrate import calibrate_fx
from lfpass.onnx.calibrate import calibrate_onnx, im2col


class Net(nn.Module):
    """A tiny CNN + MLP: strided, dilated and padded convolutions, then linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)  # grouped: skipped
        self.fc1 = nn.Linear(64, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        y = torch.relu(self.dw(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc2(torch.relu(self.fc1(y.flatten(1))))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture
def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 8, 8, generator=g) for _ in range(3)]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _captured(net: nn.Module, batches) -> dict[str, list[torch.Tensor]]:
    """Each layer's inputs, captured by hand."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(a[0].double()))
             for name, m in net.named_children()]
    with torch.no_grad():
        for b in batches:
            net(b)
    for h in hooks:
        h.remove()
    return seen


def test_gram_is_x_transpose_x_by_hand(net, batches):
    stats = calibrate_fx(net, batches)
    x = torch.cat(_captured(net, batches)["fc1"]).numpy()
    assert stats["fc1.weight"].count == 6 and stats["fc1.weight"].kernel == 1
    assert _rel(stats["fc1.weight"].gram, x.T @ x) < 1e-9
    assert _rel(stats["fc1.weight"].total, x.sum(0)) < 1e-9
    assert stats.batches == 3
    assert "dw.weight" not in stats  # a grouped convolution has no [out, in] view of its input


@pytest.mark.parametrize("name,stride,padding,dilation", [("c1", 2, 1, 1), ("c2", 1, 2, 2)])
def test_conv_gram_is_unfold_by_hand(net, batches, name, stride, padding, dilation):
    stats = calibrate_fx(net, batches)
    x = torch.cat(_captured(net, batches)[name])
    cols = F.unfold(x, 3, dilation=dilation, padding=padding, stride=stride)  # [N, C*9, L]
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()
    s = stats[f"{name}.weight"]
    assert s.kernel == 9 and s.count == rows.shape[0]
    assert _rel(s.gram, rows.T @ rows) < 1e-9
    # the numpy im2col of the ONNX frontend orders patches as unfold does
    pads = (padding, padding, padding, padding)
    np.testing.assert_allclose(im2col(x.numpy(), (3, 3), (stride, stride), pads, (dilation, dilation)), rows,
                               rtol=0, atol=0)


def test_conv1d_and_same_padding_patches():
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 2, 4, padding="same", dilation=2)  # pads 3 before, 3 after
    x = torch.randn(2, 3, 9)
    s = calibrate_fx(nn.Sequential(conv), [x])["0.weight"]
    padded = F.pad(x, (3, 3)).double()
    rows = F.unfold(padded[:, :, None, :], (1, 4), dilation=(1, 2)).transpose(1, 2).reshape(-1, 12).numpy()
    assert s.kernel == 4 and s.count == 18
    assert _rel(s.gram, rows.T @ rows) < 1e-9


def test_hooks_and_interpreter_agree(net, batches):
    """A plain module (hooks), its symbolic trace (hooks on call_module) and its
    torch.export graph (an Interpreter on aten calls) see the same inputs."""
    plain = calibrate_fx(net, batches)
    traced = calibrate_fx(torch.fx.symbolic_trace(net), batches)
    exported = calibrate_fx(torch.export.export(net, (batches[0],)).module(), batches)
    assert sorted(plain) == sorted(traced) == sorted(exported) == ["c1.weight", "c2.weight", "fc1.weight",
                                                                   "fc2.weight"]
    for k in plain:
        assert traced[k].count == exported[k].count == plain[k].count
        assert _rel(traced[k].gram, plain[k].gram) < 1e-12
        assert _rel(exported[k].gram, plain[k].gram) < 1e-9


def test_mode_is_restored_and_no_batches_is_an_error(net, batches):
    net.train()
    calibrate_fx(net, batches)
    assert all(m.training for m in net.modules())
    with pytest.raises(CalibrationError, match="no calibration batches"):
        calibrate_fx(net, [])


def test_a_layer_that_never_ran_has_no_entry():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x)

    stats = calibrate_fx(Branchy(), [torch.randn(3, 4)])
    assert list(stats) == ["a.weight"]


def test_cross_statistics_by_hand(net, batches):
    pairs = [("fc1.weight", "fc2.weight"), ("c2.weight", "fc1.weight"), ("c1.weight", "c2.weight")]
    stats = calibrate_fx(net, batches, cross=pairs)
    seen = _captured(net, batches)
    expected = sum(a.numpy().T @ b.numpy() for a, b in zip(seen["fc1"], seen["fc2"]))
    assert _rel(stats.cross[("fc1.weight", "fc2.weight")], expected) < 1e-9
    assert _rel(stats.cross_of("fc2.weight", "fc1.weight"), expected.T) < 1e-9
    assert ("c2.weight", "fc1.weight") not in stats.cross  # 32 pixels against 2 rows: positions differ
    # c1 and c2 read different resolutions (8x8, 4x4): none; c2 and its own input per pixel
    assert ("c1.weight", "c2.weight") not in stats.cross
    stats = calibrate_fx(net, batches, cross=[("c2.weight", "dw.weight")])
    assert ("c2.weight", "dw.weight") not in stats.cross  # dw is skipped
    pixels = [x.permute(0, 2, 3, 1).reshape(-1, 4).numpy() for x in seen["c2"]]
    stats = calibrate_fx(net, batches, cross=[("c2.weight", "c2.weight")])
    assert _rel(stats.cross[("c2.weight", "c2.weight")], sum(p.T @ p for p in pixels)) < 1e-9


def test_onnx_calibration_equals_fx(net, batches, tmp_path):
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (batches[0],), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    pairs = [("fc1.weight", "fc2.weight")]
    fx_stats = calibrate_fx(net, batches, cross=pairs)
    feeds = [{"x": b.numpy()} for b in batches]
    onnx_stats = calibrate_onnx(path, feeds, cross=pairs)
    assert sorted(onnx_stats) == sorted(fx_stats)
    for k in fx_stats:
        assert onnx_stats[k].count == fx_stats[k].count and onnx_stats[k].kernel == fx_stats[k].kernel
        assert _rel(onnx_stats[k].gram, fx_stats[k].gram) < 1e-6
        assert _rel(onnx_stats[k].total, fx_stats[k].total) < 1e-6
    assert _rel(onnx_stats.cross[pairs[0]], fx_stats.cross[pairs[0]]) < 1e-6
    # external data stays where it is, and an in-memory model is left as it was
    model = ir.load(path)
    ir.save(model, tmp_path / "ext.onnx", external_data="ext.data", size_threshold_bytes=0)
    before = sorted(p.name for p in tmp_path.iterdir())
    ext = calibrate_onnx(tmp_path / "ext.onnx", feeds)
    assert _rel(ext["fc1.weight"].gram, fx_stats["fc1.weight"].gram) < 1e-6
    loaded = ir.load(tmp_path / "ext.onnx")
    outputs = [v.name for v in loaded.graph.outputs]
    assert _rel(calibrate_onnx(loaded, feeds)["c2.weight"].gram, fx_stats["c2.weight"].gram) < 1e-6
    assert [v.name for v in loaded.graph.outputs] == outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(CalibrationError, match="no calibration batches"):
        calibrate_onnx(path, [])


def test_exported_hf_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    exported = torch.export.export(model, (ids,), {"attention_mask": mask}).module()
    batches = [((ids,), {"attention_mask": mask})]
    stats = calibrate_fx(exported, [{"input_ids": ids, "attention_mask": mask}])
    plain = calibrate_fx(model, [{"input_ids": ids, "attention_mask": mask}])
    assert len(plain) == 2 * 6 + 1  # q, k, v, attention output, intermediate, output per layer; the pooler
    assert sorted(stats) == sorted(plain)
    for k in plain:
        assert stats[k].count == plain[k].count
        assert _rel(stats[k].gram, plain[k].gram) < 1e-6
    assert batches
