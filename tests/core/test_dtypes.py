"""Exact stays exact, in every dtype: merging copies returns their bits in
float16, bfloat16, float32 and float64 (ONNX and FX); a merge of different
members is the float64 result rounded once into the members' dtype; integer
and float8 tensors are no sites; a non-finite member is refused by name."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import lfpass
from lfpass.core.errors import PlanError
from lfpass.core.plan import FusionGroup, FusionPlan
from lfpass.core.rules import get_rule
from lfpass.fx import find_sites as fx_sites
from lfpass.onnx import find_sites as onnx_sites
from lfpass.onnx import optimize
from lfpass.onnx.load import load_model

LOSSLESS = lfpass.load_pipeline(Path(__file__).parents[2] / "passes" / "lossless.toml")
WIDTH = 8
RNG = np.random.default_rng(0)

_ONNX = {  # name -> (TensorProto type, numpy dtype)
    "f32": (TensorProto.FLOAT, np.dtype(np.float32)),
    "f16": (TensorProto.FLOAT16, np.dtype(np.float16)),
    "f64": (TensorProto.DOUBLE, np.dtype(np.float64)),
    "bf16": (TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16)),
}


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _weight(dtype: np.dtype) -> np.ndarray:
    """Random values with a -0.0 and digits past float32 (for float64) in them."""
    w = RNG.standard_normal((WIDTH, WIDTH)) * 0.3 + 1e-9 * RNG.standard_normal((WIDTH, WIDTH))
    w[0, 0] = -0.0
    return w.astype(dtype)


def _tensor(name: str, array: np.ndarray, proto_type: int) -> TensorProto:
    return helper.make_tensor(name, proto_type, array.shape, np.ascontiguousarray(array).tobytes(), raw=True)


def _dtype_model(tmp_path: Path, kinds: tuple[str, ...], name: str) -> tuple[Path, dict[str, np.ndarray]]:
    """Per dtype, ``x -> MatMul(w0) -> MatMul(w1)`` where ``w1`` is a bit-identical copy of ``w0``."""
    nodes, inits, inputs, outputs, weights = [], [], [], [], {}
    for kind in kinds:
        proto_type, dtype = _ONNX[kind]
        w = _weight(dtype)
        h = f"x_{kind}"
        inputs.append(helper.make_tensor_value_info(h, proto_type, ["batch", WIDTH]))
        for i in range(2):
            wname = f"{kind}.blocks.{i}.weight"
            weights[wname] = w.copy()
            inits.append(_tensor(wname, w, proto_type))
            nodes.append(helper.make_node("MatMul", [h, wname], [f"{kind}_h{i}"], name=f"/{kind}/blocks.{i}/MatMul"))
            h = f"{kind}_h{i}"
        outputs.append(helper.make_tensor_value_info(h, proto_type, ["batch", WIDTH]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / name
    onnx.save(model, path)
    return path, weights


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in load_model(path).graph.initializers.items()}


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_onnx_copies_stay_bit_identical_in_every_float_dtype(tmp_path):
    path, weights = _dtype_model(tmp_path, ("f32", "f16", "f64", "bf16"), "all.onnx")
    out = tmp_path / "all.fused.onnx"
    result = optimize(path, out, LOSSLESS, check=False)  # onnxruntime has no bfloat16 MatMul on CPU
    assert len(result.plan.groups) == 4 and result.written
    fused = _initializers(out)
    assert len(fused) == 4  # one shared tensor per dtype
    for name, array in fused.items():
        original = weights[name]
        assert array.dtype == original.dtype, name
        np.testing.assert_array_equal(_bits(array), _bits(original), err_msg=name)


def test_onnx_copies_give_exactly_the_same_outputs_in_onnxruntime(tmp_path):
    kinds = ("f32", "f16", "f64")
    path, weights = _dtype_model(tmp_path, kinds, "ort.onnx")
    out = tmp_path / "ort.fused.onnx"
    result = optimize(path, out, LOSSLESS, strict=True)
    assert len(result.plan.groups) == 3 and result.validation.passed
    feeds = {f"x_{k}": RNG.standard_normal((3, WIDTH)).astype(_ONNX[k][1]) for k in kinds}
    for before, after in zip(_run(path, feeds), _run(out, feeds)):
        assert before.dtype == after.dtype
        np.testing.assert_array_equal(_bits(after), _bits(before))
    for name, array in _initializers(out).items():
        np.testing.assert_array_equal(_bits(array), _bits(weights[name]), err_msg=name)


def test_onnx_integer_weights_are_no_sites_and_stay_byte_identical(tmp_path):
    big = np.full((4, 4), 2**24 + 1, dtype=np.int64)  # float32 rounds it to 2**24
    big[0] = np.arange(4) * 50_000_001
    f32 = _weight(np.dtype(np.float32))
    inits = [numpy_helper.from_array(big.copy(), f"i.blocks.{i}.weight") for i in range(2)]
    inits += [numpy_helper.from_array(f32.copy(), f"f.blocks.{i}.weight") for i in range(2)]
    nodes = [
        helper.make_node("MatMul", ["xi", "i.blocks.0.weight"], ["i0"], name="/i/blocks.0/MatMul"),
        helper.make_node("MatMul", ["i0", "i.blocks.1.weight"], ["i1"], name="/i/blocks.1/MatMul"),
        helper.make_node("MatMul", ["xf", "f.blocks.0.weight"], ["f0"], name="/f/blocks.0/MatMul"),
        helper.make_node("MatMul", ["f0", "f.blocks.1.weight"], ["f1"], name="/f/blocks.1/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("xi", TensorProto.INT64, [1, 4]),
         helper.make_tensor_value_info("xf", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("i1", TensorProto.INT64, [1, 4]),
         helper.make_tensor_value_info("f1", TensorProto.FLOAT, [1, WIDTH])],
        inits,
    )
    path = tmp_path / "int.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)

    found = onnx_sites(load_model(path))
    assert sorted(s.name for s in found.sites) == ["f/blocks.0/MatMul", "f/blocks.1/MatMul"]
    assert "/i/blocks.0/MatMul: weight 'i.blocks.0.weight' is int64, not a floating-point tensor" in found.skipped

    out = tmp_path / "int.fused.onnx"
    result = optimize(path, out, LOSSLESS, check=False)
    assert len(result.plan.groups) == 1
    fused = _initializers(out)
    assert sorted(fused) == ["f.blocks.0.weight", "i.blocks.0.weight", "i.blocks.1.weight"]
    for i in range(2):
        assert fused[f"i.blocks.{i}.weight"].tobytes() == big.tobytes()
    feeds = {"xi": np.ones((1, 4), dtype=np.int64), "xf": np.ones((1, WIDTH), dtype=np.float32)}
    for before, after in zip(_run(path, feeds), _run(out, feeds)):
        np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize(
    "proto_type, reason",
    [
        (TensorProto.INT8, "is int8, not a floating-point tensor"),
        (TensorProto.BOOL, "is bool, not a floating-point tensor"),
        (TensorProto.FLOAT8E4M3FN, "is float8e4m3fn, a quantized floating-point type lfpass does not merge"),
    ],
)
def test_onnx_cast_from_non_float_weights_are_skipped_with_a_reason(proto_type, reason):
    """A weight stored as int8, bool or float8 and cast to float32 before the MatMul is no site."""
    w = helper.make_tensor("w", proto_type, [4, 4], np.zeros(16, dtype=np.uint8).tobytes(), raw=True)
    nodes = [
        helper.make_node("Cast", ["w"], ["w_f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w_f"], ["y"], name="/blocks.0/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model, full_check=True)
    found = onnx_sites(ir.serde.deserialize_model(model))
    assert found.sites == []
    assert found.skipped == [f"/blocks.0/MatMul: weight 'w' {reason}"]


_TORCH = {"f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}


class _Blocks(nn.Module):
    def __init__(self, dtype: torch.dtype, depth: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH, dtype=dtype) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def _torch_bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("kind", sorted(_TORCH))
def test_fx_copied_blocks_stay_bit_identical(kind):
    torch.manual_seed(0)
    model = _Blocks(_TORCH[kind])
    with torch.no_grad():
        model.blocks[0].weight[0, 0] = -0.0
        for dst, src in ((2, 0), (3, 1)):
            model.blocks[dst].load_state_dict(model.blocks[src].state_dict())
    fused, plan = lfpass.fuse(model, LOSSLESS)
    assert len(plan.groups) == 2
    assert lfpass.unique_parameters(fused) == lfpass.unique_parameters(model) // 2
    assert fused.blocks[2].weight is fused.blocks[0].weight
    for name, p in model.named_parameters():
        q = fused.get_parameter(name)
        assert q.dtype == p.dtype and torch.equal(_torch_bits(q), _torch_bits(p)), name
    x = torch.randn(3, WIDTH, dtype=_TORCH[kind])
    assert torch.equal(_torch_bits(fused(x)), _torch_bits(model(x)))


class _IntLinears(nn.Module):
    """Two float blocks, and two integer "layers" whose values float32 cannot hold."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))
        self.ints = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        big = torch.full((4, 4), 2**24 + 1, dtype=torch.int64)
        for lin in self.ints:
            lin.weight = nn.Parameter(big.clone(), requires_grad=False)
            lin.bias = nn.Parameter(torch.arange(4) * 50_000_001, requires_grad=False)
        self.blocks[1].load_state_dict(self.blocks[0].state_dict())

    def forward(self, x, i):
        for block in self.blocks:
            x = block(x)
        for lin in self.ints:
            i = lin(i)
        return x, i


def test_fx_integer_parameters_are_no_sites():
    model = _IntLinears()
    assert [s.name for s in fx_sites(model).sites] == ["blocks.0", "blocks.1"]
    fused, plan = lfpass.fuse(model, LOSSLESS)
    assert [g.members for g in plan.groups] == [("blocks.0", "blocks.1")]
    for name in ("weight", "bias"):
        a, b = getattr(fused.ints[0], name), getattr(fused.ints[1], name)
        assert a is not b and torch.equal(a, getattr(model.ints[0], name)) and torch.equal(b, a)
    x, i = torch.randn(2, WIDTH), torch.ones(2, 4, dtype=torch.int64)
    for before, after in zip(model(x, i), fused(x, i)):
        assert torch.equal(before, after)


# [1, 1 + ulp, tiny, 0]: the float64 mean sits just above a tie of the target dtype, and a float32
# sum drops `tiny`, landing on the tie (which rounds to even, down): one rounding gets it right.
_TIE = {
    "f16": (np.float16, [1.0, 1.0 + 2**-10, 2**-24, 0.0], 0.5 + 2**-11),
    "bf16": (ml_dtypes.bfloat16, [1.0, 1.0 + 2**-7, 2**-24, 0.0], 0.5 + 2**-8),
}


@pytest.mark.parametrize("kind", sorted(_TIE))
def test_mean_is_computed_in_float64_and_rounded_once(kind):
    dtype, values, expected = _TIE[kind]
    members = [np.full((2, 3), v, dtype=dtype) for v in values]
    merged = get_rule("mean")(members, np.ones(4), np.random.default_rng(0))
    assert merged.dtype == np.dtype(dtype)
    assert (merged.astype(np.float64) == expected).all()
    if kind == "f16":  # numpy rounds float64 to float16 once: a reference on random members
        rand = [RNG.standard_normal((16, 16)).astype(np.float16) for _ in range(5)]
        merged = get_rule("mean")(rand, np.ones(5), np.random.default_rng(0))
        reference = np.stack(rand).astype(np.float64).mean(axis=0).astype(np.float16)
        np.testing.assert_array_equal(_bits(merged), _bits(reference))


def _mean_plan(depth: int) -> FusionPlan:
    """A plan as read from JSON: all of ``_Blocks``' blocks averaged into one."""
    group = FusionGroup(tuple(f"blocks.{i}" for i in range(depth)), "mean", 1.0, "", WIDTH * (WIDTH + 1))
    return FusionPlan(groups=(group,), metric="euclidean", scope="model", params_before=1, params_after=1,
                      layer_params_before=1, layer_params_after=1, max_ratio=1.0)


@pytest.mark.parametrize("kind", sorted(_TIE))
def test_fx_mean_group_is_rounded_once(kind):
    """The FX rewrite writes the rule's result back without a float32 trip."""
    dtype, values, expected = _TIE[kind]
    model = _Blocks(_TORCH[kind])
    with torch.no_grad():
        for block, v in zip(model.blocks, values):
            block.weight.fill_(v)
            block.bias.fill_(v)
    fused = lfpass.apply(model, _mean_plan(4))
    weight = fused.blocks[3].weight
    assert weight.dtype == _TORCH[kind] and (weight.double() == expected).all()


def test_merging_a_nan_member_raises_naming_it():
    good = np.ones((2, 2), dtype=np.float16)
    bad = good.copy()
    bad[1, 0] = np.nan
    for rule in ("mean", "keep"):
        with pytest.raises(PlanError, match=r"'blocks\.1'.*NaN or Inf"):
            get_rule(rule)([good, bad], np.ones(2), np.random.default_rng(0), names=["blocks.0", "blocks.1"])
    with pytest.raises(PlanError, match="NaN or Inf"):  # identical copies of a NaN are refused too
        get_rule("keep")([bad, bad.copy()], np.ones(2), np.random.default_rng(0))
    with pytest.raises(PlanError, match="int64, not a floating-point tensor"):
        get_rule("mean")([np.ones(2, dtype=np.int64)] * 2, np.ones(2), np.random.default_rng(0))


def test_fx_plan_that_merges_a_nan_member_raises_naming_it():
    """Weights changed since planning (or a plan read from JSON): apply refuses, naming the layer."""
    model = _Blocks(torch.float32)
    with torch.no_grad():
        model.blocks[2].weight[0, 0] = float("inf")
    with pytest.raises(PlanError, match=r"'blocks\.2'.*NaN or Inf"):
        lfpass.apply(model, _mean_plan(4))
