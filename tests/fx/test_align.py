"""Alignment spaces found from torch.fx data flow, and alignment in place.

Each space's random transform (a permutation; for attention heads, a head
permutation and a rotation within each head) must leave the model's outputs
equal; a member built as an exactly transformed copy of its anchor must be
moved back onto it (similarity 1), after which averaging the pair loses
nothing; residual adds and LayerNorms between layers are no space, with the
reason said.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

from lfpass.core.align import Skipped, Transform, transform_space
from lfpass.core.plan import FusionGroup, FusionPlan
from lfpass.core.sites import ClassKey
from lfpass.fx.align import find_spaces
from lfpass.fx.frontend import align_fx

FAST = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def plan_of(*groups: tuple[str, ...]) -> FusionPlan:
    """A plan with these groups (alignment reads only the groups)."""
    key = ClassKey("linear", ())
    return FusionPlan(tuple(FusionGroup(tuple(g), "mean", 1.0, key, 0) for g in groups), "cosine", "model",
                      0, 0, 0, 0, 1.0)


def random_transform(space, rng: np.random.Generator) -> Transform:
    if space.kind == "permute":
        return Transform(rng.permutation(space.width))
    d = space.head_dim
    rotations = np.stack([np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(space.n_heads)])
    return Transform(rng.permutation(space.n_heads), rotations)


def scramble(module: nn.Module, gm: fx.GraphModule, rng: np.random.Generator) -> int:
    """Apply a random function-preserving transform to every space; the number of spaces."""
    spaces = find_spaces(gm)
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    tensors = {m.tensor: own[m.tensor].detach().double().numpy() for s in spaces for m in s.moves}
    order: dict[str, np.ndarray] = {}  # Q/K heads stay paired with V/O heads: one head order per attention
    for s in spaces:
        t = random_transform(s, rng)
        if s.kind == "heads":
            t = Transform(order.setdefault(s.tied, t.perm), t.rotations)
            order[s.key] = t.perm
        transform_space(s, t, tensors)
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(torch.from_numpy(value))
    return len(spaces)


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max()) or 1.0
    assert float((a - b).abs().max()) <= tol * scale


# -- models -------------------------------------------------------------------------------------------------

class FFN(nn.Module):
    def __init__(self, d: int, h: int, gated: bool, act: str):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.gate = nn.Linear(d, h) if gated else None
        self.down = nn.Linear(h, d)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU()}[act]

    def forward(self, x):
        h = self.up(x)
        h = self.act(self.gate(x)) * h if self.gate is not None else self.act(h)
        return self.down(nn.functional.dropout(h, 0.1, self.training))


class Residual(nn.Module):
    """Transformer-style FFN blocks: ``x = norm(x + ffn(x))``."""

    def __init__(self, depth: int = 3, d: int = 8, h: int = 16, gated: bool = False, act: str = "relu"):
        super().__init__()
        self.blocks = nn.ModuleList(FFN(d, h, gated, act) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth))

    def forward(self, x):
        for block, norm in zip(self.blocks, self.norms):
            x = norm(x + block(x))
        return x


class Plain(nn.Module):
    """A plain MLP stack: every hidden layer is a space."""

    def __init__(self, widths: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


class ConvBN(nn.Module):
    def __init__(self, ch: int = 6, depth: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(ch, ch, 3, padding=1) for _ in range(depth))
        self.bns = nn.ModuleList(nn.BatchNorm2d(ch) for _ in range(depth + 1))
        self.head = nn.Conv2d(ch, 4, 1)

    def forward(self, x):
        x = torch.relu(self.bns[0](self.stem(x)))
        for conv, bn in zip(self.convs, self.bns[1:]):
            x = torch.relu(bn(conv(x)))
        return self.head(x).mean((2, 3))


def randomise_bn(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


# -- function preserved under random transforms ------------------------------------------------------------

@FAST
@given(depth=st.integers(1, 3), d=st.integers(2, 8), h=st.integers(2, 12), gated=st.booleans(),
       act=st.sampled_from(["relu", "gelu", "silu"]), export=st.booleans(), seed=st.integers(0, 2**16))
def test_random_mlp_transforms_keep_outputs(depth, d, h, gated, act, export, seed):
    torch.manual_seed(seed)
    model = Residual(depth, d, h, gated, act).double().eval()
    x = torch.randn(4, d, dtype=torch.float64)
    gm = torch.export.export(model, (x,)).module() if export else fx.symbolic_trace(model)
    before = model(x)
    assert scramble(model, gm, np.random.default_rng(seed)) == depth
    assert_close(model(x), before)


@FAST
@given(widths=st.lists(st.integers(1, 10), min_size=2, max_size=5), seed=st.integers(0, 2**16))
def test_random_plain_stack_transforms_keep_outputs(widths, seed):
    torch.manual_seed(seed)
    model = Plain(widths).eval()
    x = torch.randn(3, widths[0])
    before = model(x)
    assert scramble(model, fx.symbolic_trace(model), np.random.default_rng(seed)) == len(widths) - 2
    assert_close(model(x), before)


@FAST
@given(ch=st.integers(1, 6), depth=st.integers(1, 3), export=st.booleans(), seed=st.integers(0, 2**16))
def test_random_cnn_bn_transforms_keep_outputs(ch, depth, export, seed):
    torch.manual_seed(seed)
    model = ConvBN(ch, depth).eval()
    randomise_bn(model, seed)
    x = torch.randn(2, 3, 6, 6)
    gm = torch.export.export(model, (x,)).module() if export else fx.symbolic_trace(model)
    before = model(x)
    assert scramble(model, gm, np.random.default_rng(seed)) == depth + 1
    assert_close(model(x), before)


# -- permuted copies are recovered ------------------------------------------------------------------------

def permuted_copy(model: Residual, src: int, dst: int, rng: np.random.Generator) -> None:
    """Block ``dst`` becomes block ``src`` with its hidden units permuted."""
    a, b = model.blocks[src], model.blocks[dst]
    perm = torch.from_numpy(rng.permutation(a.up.out_features))
    with torch.no_grad():
        for name in ("up", "gate"):
            if getattr(a, name) is not None:
                getattr(b, name).weight.copy_(getattr(a, name).weight[perm])
                getattr(b, name).bias.copy_(getattr(a, name).bias[perm])
        b.down.weight.copy_(a.down.weight[:, perm])
        b.down.bias.copy_(a.down.bias)


def average_groups(model: nn.Module, plan: FusionPlan, suffixes=(".weight", ".bias")) -> None:
    """Each group's tensors replaced by their mean (a merge done by hand)."""
    own = dict(model.named_parameters())
    with torch.no_grad():
        for group in plan.groups:
            for suffix in suffixes:
                names = [m + suffix for m in group.members]
                mean = torch.stack([own[n] for n in names]).mean(0)
                for n in names:
                    own[n].copy_(mean)


@pytest.mark.parametrize("gated", [False, True])
def test_permuted_copy_is_recovered_and_merges_losslessly(gated):
    torch.manual_seed(0)
    model = Residual(3, 8, 16, gated).double().eval()
    permuted_copy(model, 0, 2, np.random.default_rng(1))
    x = torch.randn(5, 8, dtype=torch.float64)
    before = model(x)
    names = ["up", "down"] + (["gate"] if gated else [])
    plan = plan_of(*[(f"blocks.0.{n}", f"blocks.2.{n}") for n in names])
    report = align_fx(model, plan)
    assert [a.space for a in report.aligned] == ["blocks.2.up"]
    moved = report.aligned[0]
    assert moved.before < 0.5 and moved.after == pytest.approx(1.0, abs=1e-12) and moved.floor < 0.9
    assert_close(model(x), before, 1e-12)  # alignment keeps the function
    for n in names:
        assert torch.equal(model.blocks[0].get_submodule(n).weight, model.blocks[2].get_submodule(n).weight)
    average_groups(model, plan)
    assert_close(model(x), before, 1e-12)  # and averaging the aligned copies loses nothing


def test_random_pair_beats_floor_and_keeps_outputs():
    torch.manual_seed(0)
    model = Residual(2, 16, 64).eval()
    x = torch.randn(5, 16)
    before = model(x)
    report = align_fx(model, plan_of(("blocks.0.up", "blocks.1.up")))
    (moved,) = report.aligned
    assert moved.after > moved.before
    assert moved.floor > moved.before  # what matching finds in noise: the bar a real gain must clear
    assert_close(model(x), before)


def test_chain_of_groups_moves_each_space_once():
    """A plain stack whose hidden layers are all grouped: each space moves once, after its anchor."""
    torch.manual_seed(0)
    model = Plain([4, 8, 8, 8, 8, 3]).eval()
    x = torch.randn(5, 4)
    before = model(x)
    report = align_fx(model, plan_of(("layers.1", "layers.2", "layers.3")))
    moved = [a.space for a in report.aligned]
    assert len(moved) == len(set(moved)) == 3
    assert_close(model(x), before)


class TwoBranch(nn.Module):
    """A stem feeding two conv -> BatchNorm -> ReLU -> conv branches (same input space)."""

    def __init__(self, ch: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, padding=1)
        self.a, self.b = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(ch), nn.BatchNorm2d(ch)
        self.head_a, self.head_b = nn.Conv2d(ch, 4, 1), nn.Conv2d(ch, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        ya = self.head_a(torch.relu(self.bn_a(self.a(x))))
        yb = self.head_b(torch.relu(self.bn_b(self.b(x))))
        return ya + yb


def test_cnn_permuted_copy_is_recovered_and_merges_losslessly():
    torch.manual_seed(0)
    model = TwoBranch().eval()
    randomise_bn(model, 0)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(6))
    with torch.no_grad():  # branch b = branch a with its hidden channels (and their BatchNorm) permuted
        model.b.weight.copy_(model.a.weight[perm])
        model.b.bias.copy_(model.a.bias[perm])
        model.head_b.weight.copy_(model.head_a.weight[:, perm])
        model.head_b.bias.copy_(model.head_a.bias)
        for v in ("weight", "bias", "running_mean", "running_var"):
            getattr(model.bn_b, v).copy_(getattr(model.bn_a, v)[perm])
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    plan = plan_of(("a", "b"), ("head_a", "head_b"))
    report = align_fx(model, plan, example_inputs=(x,))
    (moved,) = report.aligned
    assert (moved.space, moved.anchor) == ("b", "a")
    assert moved.after == pytest.approx(1.0, abs=1e-12) and moved.before < 0.9
    assert torch.equal(model.a.weight, model.b.weight) and torch.equal(model.bn_a.running_var, model.bn_b.running_var)
    assert_close(model(x), before)
    average_groups(model, plan)
    assert_close(model(x), before)


def test_cnn_chain_alignment_keeps_outputs():
    torch.manual_seed(0)
    model = ConvBN(6, 3).eval()
    randomise_bn(model, 0)
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    report = align_fx(model, plan_of(("convs.0", "convs.1", "convs.2")), gm=torch.export.export(model, (x,)).module())
    assert len(report.aligned) == 3
    assert_close(model(x), before)


# -- negative cases -----------------------------------------------------------------------------------------

class Between(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        h = self.a(x)
        if self.kind == "residual":
            h = h + x
        elif self.kind == "norm":
            h = self.norm(h)
        elif self.kind == "reduce":
            h = h - h.mean(-1, keepdim=True)
        return self.b(torch.relu(h))


@pytest.mark.parametrize("kind, says", [("residual", "residual"), ("norm", "norm"), ("reduce", "mean")])
def test_no_space_across_a_residual_norm_or_reduction(kind, says):
    skipped: list[Skipped] = []
    assert find_spaces(fx.symbolic_trace(Between(kind)), skipped) == []
    reasons = {s.name: s.reason for s in skipped}
    assert says in reasons["a"]
    assert "graph output" in reasons["b"]
    model = Between(kind)
    report = align_fx(model, plan_of(("a", "b")))
    assert report.aligned == [] and report.changed == set()


# -- transformers ------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16, attn_implementation="sdpa")
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def bert_out(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


@pytest.fixture(scope="module")
def bert():
    model, inputs = tiny_bert()
    return model, inputs, torch.export.export(model, (), inputs).module()


def test_bert_spaces(bert):
    model, _, gm = bert
    skipped: list[Skipped] = []
    spaces = {s.key: s for s in find_spaces(gm, skipped)}
    assert set(spaces) == {f"encoder.layer.{i}.{p}" for i in range(2) for p in
                           ("attention.self.query:qk", "attention.self.value:vo", "intermediate.dense")}
    qk = spaces["encoder.layer.0.attention.self.query:qk"]
    assert (qk.kind, qk.n_heads, qk.head_dim) == ("heads", 4, 8)
    assert spaces["encoder.layer.0.attention.self.value:vo"].consumers == ("encoder.layer.0.attention.output.dense",)
    assert {s.name for s in skipped} >= {"encoder.layer.0.output.dense", "encoder.layer.0.attention.output.dense"}


def test_bert_random_head_rotations_keep_outputs(bert):
    model, inputs, gm = bert
    model = tiny_bert()[0]
    before = bert_out(model, inputs)
    assert scramble(model, gm, np.random.default_rng(0)) == 6
    assert_close(bert_out(model, inputs), before)


def test_bert_rotated_copy_is_recovered(bert):
    _, inputs, gm = bert
    model = tiny_bert()[0]
    rng = np.random.default_rng(3)
    spaces = {s.key: s for s in find_spaces(gm)}
    own = dict(model.named_parameters())
    tensors = {n: t.detach().double().numpy() for n, t in own.items()}
    heads = rng.permutation(4)
    for part in ("attention.self.query:qk", "attention.self.value:vo", "intermediate.dense"):
        a, b = spaces[f"encoder.layer.0.{part}"], spaces[f"encoder.layer.1.{part}"]
        for ma in a.moves:  # layer 1 := layer 0 transformed at random (one head order for qk and vo)
            tensors[b.move(ma.label).tensor] = tensors[ma.tensor].copy()
        t = random_transform(b, rng)
        transform_space(b, Transform(heads, t.rotations) if b.kind == "heads" else t, tensors)
    with torch.no_grad():
        for n, t in own.items():
            t.copy_(torch.from_numpy(tensors[n]))
    before = bert_out(model, inputs)
    layer = "encoder.layer.{}."
    names = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]
    plan = plan_of(*[(layer.format(0) + n, layer.format(1) + n) for n in names])
    report = align_fx(model, plan, gm=gm)
    assert len(report.aligned) == 3
    for a in report.aligned:
        assert a.after == pytest.approx(1.0, abs=1e-6), a
        assert a.floor < 0.9
    assert_close(bert_out(model, inputs), before)
    for n in names[:3]:
        w0, w1 = model.get_parameter(layer.format(0) + n + ".weight"), model.get_parameter(layer.format(1) + n + ".weight")
        assert torch.allclose(w0, w1, atol=1e-6)


def test_bert_align_through_export_by_example_inputs():
    model, inputs = tiny_bert()
    before = bert_out(model, inputs)
    plan = plan_of(("encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"),
                   ("encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"))
    report = align_fx(model, plan, example_inputs=inputs)
    assert {a.kind for a in report.aligned} == {"heads", "permute"}
    assert all(a.after >= a.before for a in report.aligned)
    assert_close(bert_out(model, inputs), before)


def test_gpt2_mlp_aligned_packed_attention_skipped():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 7))}
    before = model(**inputs).last_hidden_state
    plan = plan_of(("h.0.mlp.c_fc", "h.1.mlp.c_fc"), ("h.0.attn.c_attn", "h.1.attn.c_attn"))
    report = align_fx(model, plan, example_inputs=inputs)
    assert [a.space for a in report.aligned] == ["h.1.mlp.c_fc"]
    assert any("packed" in s.reason for s in report.skipped)
    with torch.no_grad():
        assert_close(model(**inputs).last_hidden_state, before)


def test_torch_transformer_encoder_is_skipped_with_reason():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    before = model(x)
    plan = plan_of(("layers.0.linear1", "layers.1.linear1"))
    report = align_fx(model, plan, example_inputs=(x,))
    assert_close(model(x), before)
    assert report.skipped  # packed in_proj attention says why
    assert all(a.after >= a.before - 1e-9 for a in report.aligned)
