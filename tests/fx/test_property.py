"""Property tests: analyze + apply on randomly generated MLP and CNN stacks.

Stacks have random depths and widths, runs of same-shaped blocks (which may
fuse), bit-identical copies and tied blocks, and are traced with
``symbolic_trace`` (``call_module`` nodes) or ``torch.export`` (aten calls on
``get_attr`` weights). Whatever the plan, the fused graph must lint, run, and
hold exactly the unique parameters the plan predicted, one group at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import lfpass
from lfpass import FusionConfig
from lfpass.core.config import SCOPES
from lfpass.core.metrics import METRICS
from lfpass.core.rules import MERGE_RULES
from lfpass.fx import find_sites

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Block:
    width: int
    bias: bool
    kernel: int = 1  # CNN only
    depthwise: bool = False  # CNN only: groups = channels when in == out
    transposed: bool = False  # CNN only


@dataclass(frozen=True)
class Spec:
    cnn: bool
    inp: int
    blocks: tuple[Block, ...]
    copies: tuple[tuple[int, int], ...]  # (src, dst): dst's tensors become bit-identical to src's
    ties: tuple[tuple[int, int], ...]  # (src, dst): dst holds src's Parameters


class Net(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.cnn = spec.cnn
        layers, prev = [], spec.inp
        for b in spec.blocks:
            if not spec.cnn:
                layers.append(nn.Linear(prev, b.width, bias=b.bias))
            elif b.transposed:
                layers.append(nn.ConvTranspose2d(prev, b.width, b.kernel, padding=b.kernel // 2, bias=b.bias))
            else:
                groups = b.width if b.depthwise and prev == b.width else 1
                layers.append(nn.Conv2d(prev, b.width, b.kernel, padding=b.kernel // 2, groups=groups, bias=b.bias))
            prev = b.width
        self.blocks = nn.ModuleList(layers)
        self.head = nn.Linear(prev, 3)
        with torch.no_grad():
            for src, dst in spec.copies:
                if same_layer(self.blocks[src], self.blocks[dst]):
                    self.blocks[dst].load_state_dict(self.blocks[src].state_dict())
        for src, dst in spec.ties:
            if same_layer(self.blocks[src], self.blocks[dst]):
                self.blocks[dst].weight = self.blocks[src].weight
                self.blocks[dst].bias = self.blocks[src].bias

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        if self.cnn:
            x = x.mean((2, 3))
        return self.head(x)


def same_layer(a: nn.Module, b: nn.Module) -> bool:
    """Same type, tensor shapes and attributes: the one may hold the other's tensors."""
    keys = ("stride", "padding", "dilation", "groups", "output_padding", "transposed")
    return (
        a is not b
        and type(a) is type(b)
        and a.weight.shape == b.weight.shape
        and (a.bias is None) == (b.bias is None)
        and all(getattr(a, k, None) == getattr(b, k, None) for k in keys)
    )


@st.composite
def specs(draw) -> Spec:
    cnn = draw(st.booleans())
    widths = (2, 4) if cnn else (4, 8)
    depth = draw(st.integers(1, 6))
    run = draw(st.integers(1, 3))  # each drawn block repeats: runs of same-shaped blocks
    drawn = []
    for _ in range(depth):
        block = Block(
            width=draw(st.sampled_from(widths)),
            bias=draw(st.booleans()),
            kernel=draw(st.sampled_from((1, 3))) if cnn else 1,
            depthwise=cnn and draw(st.booleans()),
            transposed=cnn and draw(st.integers(0, 4)) == 0,
        )
        drawn.extend([block] * run)
    n = len(drawn)
    pairs = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=2)
    return Spec(cnn, draw(st.sampled_from(widths)), tuple(drawn), tuple(draw(pairs)), tuple(draw(pairs)))


configs = st.builds(
    FusionConfig,
    metric=st.sampled_from(sorted(m for m, f in METRICS.items() if not getattr(f, "needs_stats", False))),
    merge=st.sampled_from(sorted(r for r, cls in MERGE_RULES.items() if not cls.uses_stats)),
    target_ratio=st.floats(1.05, 4.0),
    ratio_scope=st.sampled_from(SCOPES),
    cross_role=st.booleans(),
    max_group_size=st.one_of(st.none(), st.integers(2, 4)),
    seed=st.integers(0, 3),
)


def build(spec: Spec, frontend: str) -> tuple[fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = Net(spec).eval()
    x = torch.randn((2, spec.inp, 5, 5) if spec.cnn else (2, spec.inp))
    if frontend == "symbolic_trace":
        return torch.fx.symbolic_trace(model), x
    return torch.export.export(model, (x,)).module(), x


def ratio_with(plan, saved: int) -> float:
    """The plan's ratio over its scope had it saved ``saved`` parameters."""
    before = plan.params_before if plan.scope == "model" else plan.layer_params_before
    return before / max(before - saved, 1)


@FAST
@given(spec=specs(), config=configs, frontend=st.sampled_from(["symbolic_trace", "export"]))
def test_fused_graph_is_sound(spec, config, frontend):
    gm, x = build(spec, frontend)
    plan = lfpass.analyze(gm, config)
    sites = find_sites(gm).by_name()

    # The plan: disjoint groups of compatible sites, each saving (members - 1) tensors.
    assert plan.params_before == lfpass.unique_parameters(gm)
    members = [m for g in plan.groups for m in g.members]
    assert len(members) == len(set(members))
    for g in plan.groups:
        assert len(g.members) >= 2 and g.numel > 0
        assert len({sites[m].class_key(config.cross_role) for m in g.members}) == 1
        assert all(sites[m].numel == g.numel for m in g.members)
        assert config.max_group_size is None or len(g.members) <= config.max_group_size
    saved = plan.params_before - plan.params_after
    assert saved == sum((len(g.members) - 1) * g.numel for g in plan.groups)

    # How far it went: to the target, and no further than one merge past it.
    if plan.reached:
        assert plan.ratio >= config.target_ratio
        # Greedy stops at the first merge that reaches the target; that merge saved
        # one tensor of some group's class, so before it the ratio was below target.
        assert ratio_with(plan, saved - max(g.numel for g in plan.groups)) < config.target_ratio
    else:
        assert "out of reach" in plan.message
        assert plan.max_ratio < config.target_ratio
        assert plan.ratio == pytest.approx(plan.max_ratio)
    if plan.max_ratio >= config.target_ratio:
        assert plan.reached

    # The rewrite: one group at a time, unique parameters fall strictly and as planned.
    with torch.no_grad():
        ref = gm(x)
    counts = []
    for k in range(len(plan.groups) + 1):
        step = plan.take(k)
        fused = lfpass.apply(gm, step)
        fused.graph.lint()
        assert lfpass.unique_parameters(fused) == step.params_after
        counts.append(step.params_after)
        with torch.no_grad():
            out = fused(x)
        assert out.shape == ref.shape and torch.isfinite(out).all()
    assert counts[-1] == plan.params_after
    assert all(a > b for a, b in zip(counts, counts[1:]))
    assert lfpass.unique_parameters(gm) == plan.params_before  # apply copied its input


@FAST
@given(spec=specs(), cross_role=st.booleans(), frontend=st.sampled_from(["symbolic_trace", "export"]))
def test_bit_identical_copies_fuse_losslessly(spec, cross_role, frontend):
    """Merging only exact copies must not change the outputs (a design invariant)."""
    gm, x = build(spec, frontend)
    # Distinct random tensors are nowhere near a cosine of 1 - 1e-9; exact copies score 1.
    plan = lfpass.analyze(gm, FusionConfig(target_ratio=None, threshold=1 - 1e-9, cross_role=cross_role))
    found = find_sites(gm)
    where = plan.group_of()

    def equal(a, b) -> bool:
        return all(torch.equal(found.params[u], found.params[v]) for u, v in zip(a.tensors, b.tensors))

    # Every exact copy is fused with its original, and nothing else is.
    for i, a in enumerate(found.sites):
        for b in found.sites[i + 1 :]:
            if a.class_key(cross_role) == b.class_key(cross_role) and equal(a, b):
                assert a.name in where and where.get(b.name) == where[a.name]
    for g in plan.groups:
        anchor = found.by_name()[g.members[0]]
        assert all(equal(anchor, found.by_name()[m]) for m in g.members[1:])
    fused = lfpass.apply(gm, plan)
    fused.graph.lint()
    assert lfpass.unique_parameters(fused) == plan.params_after
    with torch.no_grad():
        # Averaging equal float32 values returns them exactly; allow only for
        # summation order in the kernels.
        torch.testing.assert_close(fused(x), gm(x), atol=1e-6, rtol=1e-6)


def test_max_group_size_ceiling_is_what_the_planner_reaches():
    """Greedy packing under a cap can strand groups (2+2+2 with max_group_size=3);
    the ceiling the plan reports is the one it can reach, not an ideal packing."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(6)])
    base = [torch.randn(8, 8) for _ in range(3)]
    with torch.no_grad():  # three tight pairs, far from each other
        for i, layer in enumerate(model):
            layer.weight.copy_(base[i // 2] + 1e-3 * torch.randn(8, 8))
    plan = lfpass.analyze(model, FusionConfig(target_ratio=2.5, ratio_scope="layers", max_group_size=3))
    assert [len(g.members) for g in plan.groups] == [2, 2, 2]
    assert plan.max_ratio == pytest.approx(2.0) == pytest.approx(plan.ratio)
    assert not plan.reached and "ceiling 2.000" in plan.message
    assert lfpass.analyze(model, FusionConfig(target_ratio=2.0, ratio_scope="layers", max_group_size=3)).reached
