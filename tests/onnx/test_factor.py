"""Layers written through a shared basis in ONNX graphs built with onnx.helper
(:mod:`lfpass.onnx.factor`): at full rank onnxruntime gives the original outputs back
(float32, 1e-4); the basis is one initializer read by every member's new node; at a low
rank the unique parameters fall by exactly what the plan predicts and the outputs are the
low-rank product's; a group of one is per-layer SVD; refusals are one line, name the
layer and leave the model as it was."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lfpass.core.bases import Factor, fit_basis, plan_factors
from lfpass.core.calibration import Calibration, accumulate
from lfpass.core.errors import PlanError
from lfpass.core.layers import from_matrix, layers_of, layout_of, to_matrix
from lfpass.core.lowrank import Member, activation_svd, plain_svd
from lfpass.core.plan import Factored, FusionPlan
from lfpass.onnx import find_sites
from lfpass.onnx.frontend import OnnxFrontend
from tests.onnx.test_lowrank import run  # onnxruntime with its optimisations off, after the full check

WIDTH = 12
CH = 6
FULL = 1e-4  # full rank: float32 round-off through the basis
SAME = 1e-5  # the written graph against the same factors' product


# -- tiny models --------------------------------------------------------------------------------------

def _model(nodes, inits, in_shape, out_name, out_shape) -> ir.Model:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def mlp(depth=3, seed=0, transposed=False) -> ir.Model:
    """``x -> (MatMul W_i, Add b_i, Tanh)*``; ``transposed``: the weights are stored
    ``[out, in]`` and read through Transpose nodes, as exporters write ``nn.Linear``."""
    rng = np.random.default_rng(seed)
    nodes, inits, h = [], [], "x"
    for i in range(depth):
        w = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.4
        inits += [numpy_helper.from_array(w, f"blocks.{i}.fc.weight"),
                  numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32) * 0.1, f"blocks.{i}.fc.bias")]
        weight = f"blocks.{i}.fc.weight"
        if transposed:
            nodes.append(helper.make_node("Transpose", [weight], [f"w{i}t"], name=f"/blocks.{i}/fc/Transpose",
                                          perm=[1, 0]))
            weight = f"w{i}t"
        nodes += [helper.make_node("MatMul", [h, weight], [f"mm{i}"], name=f"/blocks.{i}/fc/MatMul"),
                  helper.make_node("Add", [f"mm{i}", f"blocks.{i}.fc.bias"], [f"fc{i}"], name=f"/blocks.{i}/fc/Add"),
                  helper.make_node("Tanh", [f"fc{i}"], [f"t{i}"], name=f"/blocks.{i}/act")]
        h = f"t{i}"
    return _model(nodes, inits, ["batch", WIDTH], h, ["batch", WIDTH])


def gemms(trans=(1, 1, 1), alpha=1.0, beta=1.0, seed=1) -> ir.Model:
    rng = np.random.default_rng(seed)
    nodes, inits, h = [], [], "x"
    for i, t in enumerate(trans):
        w = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.4
        inits += [numpy_helper.from_array(w, f"l{i}.weight"),
                  numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), f"l{i}.bias")]
        nodes += [helper.make_node("Gemm", [h, f"l{i}.weight", f"l{i}.bias"], [f"g{i}"], name=f"/l{i}/Gemm",
                                   transB=t, alpha=alpha, beta=beta),
                  helper.make_node("Tanh", [f"g{i}"], [f"t{i}"], name=f"/l{i}/act")]
        h = f"t{i}"
    return _model(nodes, inits, ["batch", WIDTH], h, ["batch", WIDTH])


def convs(groups=(1, 1), seed=2, same=False) -> ir.Model:
    """Two 3x3 stride-2 convolutions of one shape (``pads`` 1, or ``auto_pad`` SAME_UPPER)."""
    rng = np.random.default_rng(seed)
    nodes, inits, h = [], [], "x"
    geometry = {"auto_pad": "SAME_UPPER"} if same else {"pads": [1, 1, 1, 1]}
    for i, g in enumerate(groups):
        inits += [numpy_helper.from_array(rng.standard_normal((CH, CH // g, 3, 3)).astype(np.float32) * 0.3,
                                          f"c{i}.weight"),
                  numpy_helper.from_array(rng.standard_normal(CH).astype(np.float32) * 0.1, f"c{i}.bias")]
        nodes += [helper.make_node("Conv", [h, f"c{i}.weight", f"c{i}.bias"], [f"conv{i}"], name=f"/c{i}/Conv",
                                   kernel_shape=[3, 3], strides=[2, 2], group=g, **geometry),
                  helper.make_node("Relu", [f"conv{i}"], [f"r{i}"], name=f"/c{i}/act")]
        h = f"r{i}"
    return _model(nodes, inits, ["batch", CH, 8, 8], h, ["batch", CH, 2, 2])


def tied() -> ir.Model:
    """One weight read by two MatMul nodes (a layer applied twice), then a layer of the same role
    and shape."""
    rng = np.random.default_rng(3)
    w, v = (rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.4 for _ in range(2))
    nodes = [helper.make_node("MatMul", ["x", "blocks.0.weight"], ["a"], name="/blocks.0/MatMul"),
             helper.make_node("Tanh", ["a"], ["ta"], name="/act0"),
             helper.make_node("MatMul", ["ta", "blocks.0.weight"], ["b"], name="/blocks.0/MatMul_again"),
             helper.make_node("Tanh", ["b"], ["tb"], name="/act1"),
             helper.make_node("MatMul", ["tb", "blocks.1.weight"], ["y"], name="/blocks.1/MatMul")]
    inits = [numpy_helper.from_array(w, "blocks.0.weight"), numpy_helper.from_array(v, "blocks.1.weight")]
    return _model(nodes, inits, ["batch", WIDTH], "y", ["batch", WIDTH])


MODELS = {
    "mlp": (mlp, lambda: _x((7, WIDTH))),
    "mlp_transposed": (lambda: mlp(transposed=True), lambda: _x((7, WIDTH))),
    "gemm_transB": (gemms, lambda: _x((7, WIDTH))),
    "gemm": (lambda: gemms(trans=(0, 0, 0)), lambda: _x((7, WIDTH))),
    "conv": (convs, lambda: _x((3, CH, 8, 8))),
    "conv_same": (lambda: convs(same=True), lambda: _x((3, CH, 8, 8))),
    "tied": (tied, lambda: _x((7, WIDTH))),
}


def _x(shape, seed=9) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def snapshot(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


# -- plans through the core ---------------------------------------------------------------------------

def layer_names(model: ir.Model) -> list[str]:
    return [s.name for s in find_sites(model).sites]


def _matrix(found, name: str) -> np.ndarray:
    layer = layers_of(found.by_name()[name])[0]
    return to_matrix(found.load_exact(layer.weight.tensor), layout_of(layer)[0])


def plan_of(model: ir.Model, *entries: tuple[tuple[str, ...], int]) -> FusionPlan:
    """A plan whose ``factors`` are ``entries`` (members, rank, of one class), as the menu writes them."""
    found = find_sites(model)
    sites = found.by_name()
    made = []
    for members, rank in entries:
        assert len({sites[m].class_key(cross_role=True) for m in members}) == 1
        out, in_ = _matrix(found, members[0]).shape
        made.append(Factored(tuple(members), rank, sites[members[0]].class_key(cross_role=True), out, in_))
    before = OnnxFrontend(model).count(model)
    after = before - sum(f.saved for f in made)
    return FusionPlan(groups=(), metric="cosine", scope="model", params_before=before, params_after=after,
                      layer_params_before=before, layer_params_after=after, max_ratio=1.0, factors=tuple(made))


def write(model: ir.Model, plan: FusionPlan, stats: Calibration | None = None) -> list[Factor]:
    factors = plan_factors(plan, find_sites(model), stats)
    OnnxFrontend(model).factor(model, factors)
    return factors


def reference(make, factors: list[Factor]) -> ir.Model:
    """A fresh model whose factored layers hold ``up @ down`` as their dense weight."""
    model = make()
    found = find_sites(model)
    for f in factors:
        layer = layers_of(found.by_name()[f.member.layer])[0]
        stored = found.load_exact(f.member.tensor)
        dense = np.asarray(f.up, np.float64) @ np.asarray(f.down, np.float64)
        array = from_matrix(dense, layout_of(layer)[0], stored.shape).astype(stored.dtype)
        model.graph.initializers[f.member.tensor].const_value = ir.Tensor(np.ascontiguousarray(array),
                                                                          name=f.member.tensor)
    return model


def bases(model: ir.Model) -> list[ir.Value]:
    return [v for name, v in model.graph.initializers.items() if ".basis" in name]


# -- 1. full rank gives the model back; one basis read by every member ---------------------------------

@pytest.mark.parametrize("kind", list(MODELS))
def test_full_rank_shared_basis_reproduces_the_model(kind):
    make, inputs = MODELS[kind]
    model, x = make(), inputs()
    expected = run(model, x)
    members = tuple(layer_names(model))
    found = find_sites(model)
    weights = {found.by_name()[m].slots[0].tensor for m in members}
    locations = {m: found.by_name()[m].location.split(",") for m in members}
    n_nodes = len(list(model.graph))
    n_chain = sum(n.op_type == "Transpose" for n in model.graph)
    plan = plan_of(model, (members, 10_000))  # cut to the basis's full rank
    write(model, plan)

    np.testing.assert_allclose(run(model, x), expected, atol=FULL, rtol=0)
    [basis] = bases(model)  # stored once
    readers = [u.node for u in basis.uses()]
    n_reads = sum(len(v) for v in locations.values())
    assert len(readers) == n_reads  # one new MatMul / Conv per node of every member
    op = "Conv" if kind.startswith("conv") else "MatMul"
    assert {n.op_type for n in readers} == {op}
    by_name = {n.name: n for n in model.graph}
    for nodes in locations.values():
        for name in nodes:
            layer_node = by_name[name]  # the layer's node keeps its name, reads the basis's product
            assert layer_node.inputs[0].producer() in readers
            assert layer_node.inputs[1].is_initializer() and ".coeff" in layer_node.inputs[1].name
    assert not weights & set(model.graph.initializers)  # the old weights are gone
    assert not [n for n in model.graph if n.op_type == "Transpose"]  # with the chains that fed them
    assert len(list(model.graph)) == n_nodes + n_reads - n_chain


def test_gemm_alpha_beta_and_bias_stay():
    """A Gemm's alpha, beta and C are kept, whatever its transB (the core plans no such Gemm:
    factors given directly)."""
    model, x = gemms(trans=(1, 0), alpha=0.5, beta=2.0), _x((5, WIDTH))
    expected = run(model, x)
    found = find_sites(model)
    sites = found.sites
    mats = [found.load_exact(s.slots[0].tensor).astype(np.float64) for s in sites]
    mats = [mats[0], mats[1].T]  # transB = 1 stores [out, in], transB = 0 [in, out]
    down, ups = fit_basis(mats).factors(WIDTH, np.dtype(np.float32))
    factors = [Factor(Member(0, s.name, s.slots[0].tensor, s.location), "b", down, u) for s, u in zip(sites, ups)]
    OnnxFrontend(model).factor(model, factors)
    np.testing.assert_allclose(run(model, x), expected, atol=FULL, rtol=0)
    gemm = {n.name: n for n in model.graph}["/l1/Gemm"]
    assert gemm.attributes["alpha"].value == 0.5 and gemm.attributes["beta"].value == 2.0
    assert gemm.inputs[2].name == "l1.bias"
    assert len(bases(model)) == 1


# -- 2. at a low rank the plan's prediction is exact ---------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "mlp_transposed", "gemm", "gemm_transB", "conv", "tied"])
def test_low_rank_parameters_fall_as_planned(kind):
    make, inputs = MODELS[kind]
    model, x = make(), inputs()
    names = layer_names(model)
    front = OnnxFrontend(model)
    before = front.count(model)
    entries = [(tuple(names[:2]), 3)] + ([((names[2],), 2)] if len(names) > 2 else [])
    plan = plan_of(model, *entries)
    factors = write(model, plan)
    assert front.count(model) == before - sum(f.saved for f in plan.factors) == plan.params_after
    assert len(bases(model)) == len(entries)  # one initializer per basis
    out = run(model, x)
    assert not np.allclose(out, run(make(), x), atol=1e-3)  # a low rank changed the model ...
    np.testing.assert_allclose(out, run(reference(make, factors), x), atol=SAME, rtol=0)  # ... to its factors


# -- 3. a group of one is per-layer low rank -----------------------------------------------------------

def test_group_of_one_is_plain_svd():
    model, x = mlp(), _x((7, WIDTH))
    name = layer_names(model)[1]
    w = _matrix(find_sites(model), name)
    factors = write(model, plan_of(model, ((name,), 4)))
    u, v = plain_svd(w.astype(np.float32), 4)
    np.testing.assert_allclose(factors[0].up @ factors[0].down, u @ v, atol=SAME, rtol=0)
    dense = Factor(factors[0].member, "svd", v, u)
    np.testing.assert_allclose(run(model, x), run(reference(mlp, [dense]), x), atol=SAME, rtol=0)
    assert front_count_drop(mlp, model) == WIDTH * WIDTH - 4 * 2 * WIDTH


def test_group_of_one_with_calibration_is_activation_svd():
    model = mlp()
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((256, WIDTH)) * np.logspace(0, -2, WIDTH)).astype(np.float32)
    name = layer_names(model)[0]
    tensor = find_sites(model).by_name()[name].slots[0].tensor
    stats = Calibration(layers={tensor: accumulate(None, x)})  # layer 0 reads the model's input
    w = _matrix(find_sites(model), name)
    factors = write(model, plan_of(model, ((name,), 3)), stats)
    u, v = activation_svd(w.astype(np.float32), stats[tensor], 3)
    np.testing.assert_allclose(factors[0].up @ factors[0].down, u @ v, atol=SAME, rtol=0)
    dense = Factor(factors[0].member, "asvd", v, u)
    np.testing.assert_allclose(run(model, x[:16]), run(reference(mlp, [dense]), x[:16]), atol=SAME, rtol=0)


def front_count_drop(make, model: ir.Model) -> int:
    original = make()
    return OnnxFrontend(original).count(original) - OnnxFrontend(model).count(model)


# -- 4. refusals: one line, the layer named, the model untouched ----------------------------------------

def _direct(model: ir.Model, names=None, rank=2) -> list[Factor]:
    """Factors of ``names`` (default: every site) through one basis, from their weights
    flattened to ``[out, rest]``, whatever the layer (the core would refuse some)."""
    found = find_sites(model)
    sites = [s for s in found.sites if names is None or s.name in names]
    mats = [found.load_exact(s.slots[0].tensor).astype(np.float64) for s in sites]
    mats = [m.reshape(m.shape[0], -1) for m in mats]
    same = [m for m in mats if m.shape == mats[0].shape]
    assert len(same) == len(mats)
    down, ups = fit_basis(mats).factors(rank, np.dtype(np.float32))
    return [Factor(Member(0, s.name, s.slots[0].tensor, s.location), "b", down, u) for s, u in zip(sites, ups)]


def _refused(model: ir.Model, factors: list[Factor], layer: str, words: str) -> None:
    before = snapshot(model)
    with pytest.raises(PlanError) as info:
        OnnxFrontend(model).factor(model, factors)
    message = str(info.value)
    assert "\n" not in message and repr(layer) in message and words in message, message
    assert snapshot(model) == before  # nothing was written


def test_grouped_conv_is_refused_before_any_write():
    model = convs(groups=(2, 2))
    factors = _direct(model)
    _refused(model, factors, factors[0].member.layer, "grouped Conv")


def test_a_refusal_on_a_later_layer_writes_nothing():
    model = convs(groups=(1, 2))  # conv 0 would factor; conv 1 is grouped
    found = find_sites(model)
    ok, grouped = found.sites
    factors = _direct(model, [ok.name], rank=2)
    w = found.load_exact(grouped.slots[0].tensor).astype(np.float64).reshape(CH, -1)
    down, [up] = fit_basis([w]).factors(2, np.dtype(np.float32))
    factors.append(Factor(Member(1, grouped.name, grouped.slots[0].tensor, grouped.location), "other", down, up))
    _refused(model, factors, grouped.name, "grouped Conv")


def _left_matmul() -> ir.Model:
    w = _x((WIDTH, WIDTH), seed=4)
    nodes = [helper.make_node("MatMul", ["left.weight", "x"], ["y"], name="/left/MatMul")]
    return _model(nodes, [numpy_helper.from_array(w, "left.weight")], [WIDTH, "batch"], "y", [WIDTH, "batch"])


def _gemm_trans_a() -> ir.Model:
    w = _x((WIDTH, WIDTH), seed=4)
    nodes = [helper.make_node("Gemm", ["x", "ta.weight"], ["y"], name="/ta/Gemm", transA=1, transB=1)]
    return _model(nodes, [numpy_helper.from_array(w, "ta.weight")], [WIDTH, "batch"], "y", ["batch", WIDTH])


@pytest.mark.parametrize("make, words", [(_left_matmul, "from the left"), (_gemm_trans_a, "transA")])
def test_layers_without_an_out_in_matrix_are_refused(make, words):
    model = make()
    factors = _direct(model)
    _refused(model, factors, factors[0].member.layer, words)


def test_a_layer_not_in_the_model_is_refused():
    model = mlp()
    f = _direct(model)[0]
    lost = Factor(Member(0, "nowhere", f.member.tensor, "/nowhere/MatMul"), f.basis, f.down, f.up)
    _refused(model, [f, lost], "nowhere", "not in the fused model")


def test_factors_that_do_not_fit_the_weight_are_refused():
    model = mlp()
    good, bad = _direct(model)[:2]
    wrong = Factor(bad.member, bad.basis, bad.down, bad.up[:-1])  # one output too few
    _refused(model, [good, wrong], bad.member.layer, "do not fit its weight")


def test_members_of_one_basis_must_give_the_same_basis():
    model = mlp()
    a, b = _direct(model)[:2]
    other = Factor(b.member, b.basis, b.down * 2, b.up)
    _refused(model, [a, other], b.member.layer, "other values")
