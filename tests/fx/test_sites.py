"""The FX frontend on real architectures: torchvision CNNs and tiny Hugging Face transformers.

Each model is traced the way a user would (``lfpass.trace``: ``symbolic_trace``
first, ``torch.export`` when that fails), its sites are checked by concrete
name and role, and it is fused at ratio 1.5 to a graph that lints, runs, and
holds exactly the unique parameter count the plan predicted.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import fx, nn

import lfpass
from lfpass import FusionConfig, FusionPlan
from lfpass.fx import find_sites

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

IMAGE = (1, 3, 64, 64)
VOCAB = 100


# -- helpers -------------------------------------------------------------------


def site_key(sites) -> list[tuple]:
    return [(s.name, s.role, s.kind, s.signature, s.tensors, s.numel) for s in sites]


def ops(gm: fx.GraphModule) -> set[str]:
    return {n.op for n in gm.graph.nodes}


def layer_calls(gm: fx.GraphModule) -> set[str]:
    """Modules the graph calls, less the guard function torch.export adds."""
    return {n.target for n in gm.graph.nodes if n.op == "call_module"} - {"_guards_fn"}


def fuse_and_check(gm: nn.Module, plan: FusionPlan, *args, **kwargs) -> nn.Module:
    """Apply ``plan`` to ``gm`` and check the four things every rewrite must hold."""
    before = lfpass.unique_parameters(gm)
    assert before == plan.params_before
    fused = lfpass.apply(gm, plan)
    assert fused is not gm
    assert lfpass.unique_parameters(gm) == before  # the input was copied, not touched
    if isinstance(fused, fx.GraphModule):
        fused.graph.lint()
    assert lfpass.unique_parameters(fused) == plan.params_after
    assert plan.params_before - plan.params_after == sum(g.saved for g in plan.groups)
    with torch.no_grad():
        ref, out = gm(*args, **kwargs), fused(*args, **kwargs)
    first = (lambda o: o if isinstance(o, torch.Tensor) else o[0])
    assert first(out).shape == first(ref).shape
    assert torch.isfinite(first(out)).all()
    return fused


def expected_saving(*shapes: tuple[int, ...]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


# -- torchvision CNNs ----------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(IMAGE)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def resnet18_fx(resnet18, image) -> fx.GraphModule:
    return lfpass.trace(resnet18, (image,))


def test_resnet18_symbolic_trace_sites(resnet18_fx):
    gm = resnet18_fx
    assert isinstance(gm, fx.GraphModule)
    assert "call_module" in ops(gm)  # symbolic_trace succeeded: no export fallback
    sites = {s.name: s for s in find_sites(gm).sites}
    assert len(sites) == 21  # stem, 16 block convs, 3 downsample convs, fc
    assert sorted(n for n, s in sites.items() if s.kind == "linear") == ["fc"]
    for block in ("layer1.0", "layer1.1"):
        site = sites[f"{block}.conv1"]
        assert site.role == "layer1.*.conv1"
        assert site.kind == "conv"
        assert site.tensors == (f"{block}.conv1.weight",)
        assert site.location == f"{block.replace('.', '_')}_conv1"  # the call_module node
        sig = site.signature_dict()
        assert sig["shape"] == [64, 64, 3, 3] and sig["stride"] == [1, 1] and sig["padding"] == [1, 1]
        assert sig["bias"] is False and sig["groups"] == 1
    assert sites["layer2.0.downsample.0"].role == "layer2.*.downsample.*"
    assert sites["layer2.0.conv1"].signature_dict()["stride"] == [2, 2]
    assert sites["layer2.1.conv1"].signature_dict()["stride"] == [1, 1]
    assert sites["conv1"].role == "conv1"


def test_resnet18_per_role_sharing_stops_at_its_ceiling(resnet18_fx, image):
    plan = lfpass.analyze(resnet18_fx, FusionConfig(target_ratio=1.5))
    # Per role, only same-shaped layers of one role share: layer1's two conv1s and
    # two conv2s, and the stride-1 conv2s of layers 2-4 (each layer's conv1 pair
    # differs in stride or input width). Everything else is alone in its class.
    saved = expected_saving((64, 64, 3, 3), (64, 64, 3, 3), (128, 128, 3, 3), (256, 256, 3, 3), (512, 512, 3, 3))
    assert plan.params_before - plan.params_after == saved
    assert not plan.reached
    assert plan.max_ratio == pytest.approx(1.372, abs=1e-3)
    assert plan.ratio == pytest.approx(plan.max_ratio)  # fused everything it could
    assert "out of reach" in plan.message
    assert f"{plan.ratio:.3f}" in plan.message and f"{plan.max_ratio:.3f}" in plan.message
    assert "cross_role" in plan.message
    assert {g.cls.role for g in plan.groups} == {
        "layer1.*.conv1", "layer1.*.conv2", "layer2.*.conv2", "layer3.*.conv2", "layer4.*.conv2",
    }
    fuse_and_check(resnet18_fx, plan, image)


def test_resnet18_cross_role_reaches_the_target(resnet18_fx, image):
    plan = lfpass.analyze(resnet18_fx, FusionConfig(target_ratio=1.5, cross_role=True))
    assert plan.reached and plan.ratio >= 1.5 and plan.max_ratio > 2.0
    assert "overshoots the target 1.5" in plan.message  # one 2.4M-parameter merge lands past it: said
    fused = fuse_and_check(resnet18_fx, plan, image)
    assert "call_module" in ops(fused)
    bounded = lfpass.analyze(resnet18_fx, FusionConfig(target_ratio=1.5, cross_role=True, max_overshoot=0.05))
    assert 1.5 <= bounded.ratio <= 1.55 and "overshoot" not in bounded.message


def test_resnet18_nothing_similar_nothing_rewritten(resnet18_fx, image):
    """Random-init layers are nowhere near a cosine of 0.99: nothing may be fused."""
    plan = lfpass.analyze(resnet18_fx, FusionConfig(target_ratio=None, threshold=0.99))
    assert plan.groups == ()
    fused = fuse_and_check(resnet18_fx, plan, image)
    with torch.no_grad():
        assert torch.equal(fused(image), resnet18_fx(image))


def test_resnet18_export_graph_has_the_same_sites_and_takes_the_same_plan(resnet18, resnet18_fx, image):
    exported = torch.export.export(resnet18, (image,)).module()
    assert layer_calls(exported) == set()  # aten calls on get_attr weights
    assert site_key(find_sites(exported).sites) == site_key(find_sites(resnet18_fx).sites)
    assert site_key(find_sites(resnet18).sites) == site_key(find_sites(resnet18_fx).sites)
    assert find_sites(exported).by_name()["layer1.0.conv1"].location.startswith("conv2d")
    plan = lfpass.analyze(resnet18_fx, FusionConfig(target_ratio=1.5, cross_role=True))
    fused = fuse_and_check(exported, plan, image)  # a plan is portable between the two graphs
    read = {n.target for n in fused.graph.nodes if n.op == "get_attr"}
    for group in plan.groups:
        anchor, *others = group.members
        assert f"{anchor}.weight" in read
        assert not any(f"{m}.weight" in read for m in others)


def test_vgg11_fuses_its_conv_body(image):
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11(weights=None).eval()
    gm = lfpass.trace(vgg, (image,))
    sites = find_sites(gm).by_name()
    assert [n for n, s in sites.items() if s.kind == "conv"] == [
        "features.0", "features.3", "features.6", "features.8", "features.11", "features.13", "features.16", "features.18",
    ]
    assert {s.role for s in sites.values()} == {"features.*", "classifier.*"}
    # The classifier (25088x4096, 4096x4096, 4096x1000) is 95% of VGG-11 and no two of
    # its layers match, so over the whole model the ceiling is about 1.04 ...
    whole = lfpass.analyze(gm, FusionConfig(target_ratio=1.5))
    assert not whole.reached and whole.max_ratio == pytest.approx(1.037, abs=1e-3)
    # ... over the conv body (three 512x512 3x3 convs alike in shape) 1.5 is reachable.
    plan = lfpass.analyze(gm, FusionConfig(target_ratio=1.5, ratio_scope="layers", include=("features.*",)))
    assert plan.reached and plan.layer_ratio >= 1.5
    assert all(set(g.members) <= {"features.13", "features.16", "features.18"} for g in plan.groups)
    fuse_and_check(gm, plan, image)


def test_mobilenet_v2_fuses_its_conv_body(image):
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None).eval()
    gm = lfpass.trace(net, (image,))
    assert "call_module" in ops(gm)
    sites = find_sites(gm).by_name()
    assert len(sites) == 53
    depthwise = sites["features.2.conv.1.0"]
    assert depthwise.role == "features.*.conv.*.*"
    assert depthwise.signature_dict()["groups"] == 96 and depthwise.signature_dict()["shape"] == [96, 1, 3, 3]
    assert sites["classifier.1"].kind == "linear"
    # The 1280x1000 classifier is a third of the model and unique, so the whole-model
    # ceiling is about 1.30; over the conv body 1.5 is reachable.
    assert lfpass.analyze(gm, FusionConfig(target_ratio=1.5)).max_ratio == pytest.approx(1.30, abs=0.01)
    plan = lfpass.analyze(gm, FusionConfig(target_ratio=1.5, ratio_scope="layers", include=("features.*",)))
    assert plan.reached and plan.layer_ratio >= 1.5
    for group in plan.groups:
        shapes = {tuple(sites[m].signature_dict()["shape"]) for m in group.members}
        assert len(shapes) == 1
    fuse_and_check(gm, plan, image)


# -- a module called twice and a tied parameter ---------------------------------


class TwiceTied(nn.Module):
    """``shared`` is called twice; ``b`` reads ``a``'s weight (tied) with its own bias."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.shared = nn.Linear(width, width)
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.b.weight = self.a.weight
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        x = torch.relu(self.shared(x))
        x = torch.relu(self.shared(x))
        return self.head(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("frontend", ["module", "symbolic_trace", "export"])
def test_module_called_twice_and_tied_parameter_are_one_site_each(frontend):
    torch.manual_seed(0)
    model = TwiceTied().eval()
    x = torch.randn(3, 8)
    gm = {
        "module": lambda: model,
        "symbolic_trace": lambda: torch.fx.symbolic_trace(model),
        "export": lambda: torch.export.export(model, (x,)).module(),
    }[frontend]()
    sites = find_sites(gm).sites
    assert [s.name for s in sites] == ["shared", "a", "head"]
    assert sites[0].tensors == ("shared.weight", "shared.bias")
    assert sites[1].tensors == ("a.weight", "a.bias")
    if frontend != "module":
        assert len(sites[0].location.split(",")) == 2  # both calls of `shared`
        assert len(sites[1].location.split(",")) == 2  # `a` and `b` read one weight
    assert lfpass.unique_parameters(gm) == 2 * (64 + 8) + 8 + 18  # shared, a (= b.weight), b.bias, head
    # shared and a have different roles: only cross_role lets them share.
    assert lfpass.analyze(gm, FusionConfig(target_ratio=1.1)).groups == ()
    plan = lfpass.analyze(gm, FusionConfig(target_ratio=1.1, cross_role=True))
    assert [g.members for g in plan.groups] == [("shared", "a")]
    assert plan.params_before - plan.params_after == 64 + 8
    fused = fuse_and_check(gm, plan, x)
    if frontend == "export":  # every read of a's (tied) weight now reads the anchor's; the rest is gone
        read = [n.target for n in fused.graph.nodes if n.op == "get_attr"]
        assert read.count("shared.weight") == 3 and "a.weight" not in read and "b.weight" not in read
        assert not hasattr(fused.a, "weight") and not hasattr(fused.b, "weight")
    else:  # the tie is kept: a, b and shared hold one Parameter
        assert fused.get_parameter("shared.weight") is fused.get_parameter("a.weight")
        assert fused.get_parameter("b.weight") is fused.get_parameter("a.weight")
    assert fused.get_parameter("b.bias") is not fused.get_parameter("shared.bias")  # b keeps its own bias


# -- tiny Hugging Face transformers through torch.export --------------------------


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, VOCAB, (2, 8))


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=2, n_positions=32, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def traced_by_export(model, inputs, caplog) -> fx.GraphModule:
    """``lfpass.trace`` must fall back to torch.export for Hugging Face models."""
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    with caplog.at_level(logging.INFO, logger="lfpass.fx.trace"):
        gm = lfpass.trace(model, inputs)
    assert any("torch.export" in r.getMessage() and "symbolic_trace failed" in r.getMessage() for r in caplog.records)
    assert isinstance(gm, fx.GraphModule)
    assert layer_calls(gm) == set()
    return gm


BERT_ROLES = {
    "encoder.layer.*.attention.self.query": (32, 32),
    "encoder.layer.*.attention.self.key": (32, 32),
    "encoder.layer.*.attention.self.value": (32, 32),
    "encoder.layer.*.attention.output.dense": (32, 32),
    "encoder.layer.*.intermediate.dense": (64, 32),
    "encoder.layer.*.output.dense": (32, 64),
}


def test_bert_via_torch_export(bert, input_ids, caplog):
    gm = traced_by_export(bert, {"input_ids": input_ids}, caplog)
    sites = find_sites(gm).sites
    assert site_key(sites) == site_key(find_sites(bert).sites)  # same sites as the module itself
    by_role: dict[str, list] = {}
    for s in sites:
        by_role.setdefault(s.role, []).append(s)
    assert set(by_role) == set(BERT_ROLES) | {"pooler.dense"}
    for role, shape in BERT_ROLES.items():
        layers = by_role[role]
        assert [s.name for s in layers] == [role.replace("*", str(i)) for i in range(3)]
        for s in layers:
            sig = s.signature_dict()
            assert (s.kind, sig["layout"], sig["bias"], tuple(sig["shape"])) == ("linear", "out_in", True, shape)
            assert s.location.startswith("linear")  # aten.linear in the exported graph
    # With a 100-token vocabulary the embeddings are 14% of this BERT, so 1.5 is
    # reachable over the whole model (at BERT's real 30522 tokens it would not be:
    # real runs name ratio_scope="layers").
    plan = lfpass.analyze(gm, FusionConfig(target_ratio=1.5))
    assert plan.reached and plan.model_ratio >= 1.5
    assert all(g.cls.role in BERT_ROLES for g in plan.groups)
    fused = fuse_and_check(gm, plan, input_ids=input_ids)
    with torch.no_grad():
        assert fused(input_ids=input_ids).last_hidden_state.shape == (2, 8, 32)


GPT2_ROLES = {
    "transformer.h.*.attn.c_attn": (32, 96),
    "transformer.h.*.attn.c_proj": (32, 32),
    "transformer.h.*.mlp.c_fc": (32, 128),
    "transformer.h.*.mlp.c_proj": (128, 32),
}


def test_gpt2_via_torch_export(gpt2, input_ids, caplog):
    gm = traced_by_export(gpt2, {"input_ids": input_ids}, caplog)
    sites = find_sites(gm).sites
    assert site_key(sites) == site_key(find_sites(gpt2).sites)
    by_name = {s.name: s for s in sites}
    for role, shape in GPT2_ROLES.items():
        for i in range(3):
            s = by_name[role.replace("*", str(i))]
            sig = s.signature_dict()
            # Conv1D stores its weight [in, out]; the exported graph multiplies it
            # unchanged on the right of an addmm, with the bias as addmm's input.
            assert (s.role, s.kind, sig["layout"], sig["bias"], tuple(sig["shape"])) == (
                role, "linear", "in_out", True, shape,
            )
            assert s.location.startswith("addmm")
    # The LM head reads the tied token embedding: one site, named for the layer.
    head = by_name["lm_head"]
    assert head.tensors == ("transformer.wte.weight",) and head.signature_dict()["layout"] == "out_in"
    assert len(sites) == 4 * 3 + 1
    # GPT-2's tied embedding is a third of the real model (50257x768) and has no
    # partner, so its targets are stated over the fusable layers.
    plan = lfpass.analyze(gm, FusionConfig(target_ratio=1.5, ratio_scope="layers"))
    assert plan.reached and plan.layer_ratio >= 1.5 and plan.scope == "layers"
    assert all(g.cls.role in GPT2_ROLES for g in plan.groups)
    fused = fuse_and_check(gm, plan, input_ids=input_ids)
    with torch.no_grad():
        assert fused(input_ids=input_ids).logits.shape == (2, 8, VOCAB)
    assert fused.get_parameter("lm_head.weight") is fused.get_parameter("transformer.wte.weight")


def test_gpt2_bit_identical_blocks_fuse_losslessly(gpt2, input_ids):
    """Merging only exact copies must leave the exported model's logits unchanged."""
    model = type(gpt2)(gpt2.config).eval()
    model.load_state_dict(gpt2.state_dict())
    with torch.no_grad():
        model.transformer.h[2].mlp.load_state_dict(model.transformer.h[0].mlp.state_dict())
    gm = torch.export.export(model, (), {"input_ids": input_ids}).module()
    plan = lfpass.analyze(gm, FusionConfig(target_ratio=None, threshold=1.0 - 1e-6))
    assert sorted(g.members for g in plan.groups) == [
        ("transformer.h.0.mlp.c_fc", "transformer.h.2.mlp.c_fc"),
        ("transformer.h.0.mlp.c_proj", "transformer.h.2.mlp.c_proj"),
    ]
    fused = fuse_and_check(gm, plan, input_ids=input_ids)
    with torch.no_grad():
        # Bit-identical members average to themselves: the logits may differ only by
        # float32 summation order, far below any real change (which is O(1)).
        torch.testing.assert_close(
            fused(input_ids=input_ids).logits, gm(input_ids=input_ids).logits, atol=1e-6, rtol=0
        )


# -- weights read by functions, leaf modules, shared biases -----------------------


class Functional(nn.Module):
    """Weights used through functions and every common spelling of a transpose."""

    def __init__(self, width: int = 8):
        super().__init__()
        for name in ("w_in_out", "w_t", "w_dot_t", "w_permute", "w_mt", "w_transpose", "w_linear"):
            self.register_parameter(name, nn.Parameter(torch.randn(width, width)))
        self.bias = nn.Parameter(torch.randn(width))
        self.register_buffer("frozen", torch.randn(width, width))  # a buffer: not a parameter, not a site

    def forward(self, x):
        x = x @ self.w_in_out
        x = x @ self.w_t.T
        x = x @ self.w_dot_t.t()
        x = x @ self.w_permute.permute(1, 0)
        x = x @ self.w_mt.mT
        x = x @ torch.transpose(self.w_transpose, 0, 1)
        x = torch.nn.functional.linear(x, self.w_linear, self.bias)
        return x @ self.frozen


def test_functional_weights_are_the_same_sites_in_both_graphs():
    torch.manual_seed(0)
    model = Functional().eval()
    x = torch.randn(2, 8)
    traced = torch.fx.symbolic_trace(model)
    exported = torch.export.export(model, (x,)).module()
    sites = find_sites(traced).sites
    assert site_key(sites) == site_key(find_sites(exported).sites)
    layouts = {s.name: s.signature_dict()["layout"] for s in sites}
    assert layouts == {
        "w_in_out": "in_out", "w_t": "out_in", "w_dot_t": "out_in", "w_permute": "out_in",
        "w_mt": "out_in", "w_transpose": "out_in", "w_linear": "out_in",
    }
    assert find_sites(traced).by_name()["w_linear"].tensors == ("w_linear", "bias")
    for gm in (traced, exported):
        # The five bias-free transposed weights form one class (layout is in the signature).
        plan = lfpass.analyze(gm, FusionConfig(target_ratio=2.0, cross_role=True))
        assert plan.reached and {"w_t", "w_permute", "w_mt"} <= set(plan.group_of())
        fuse_and_check(gm, plan, x)


class Encoder(nn.Module):
    """Two torch encoder layers: leaves to symbolic_trace, whose layers are still sites."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True) for _ in range(2)
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_layers_inside_leaf_modules_are_sites():
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 5, 16)
    gm = torch.fx.symbolic_trace(model)
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"layers.0", "layers.1"}
    sites = find_sites(gm).sites
    assert site_key(sites) == site_key(find_sites(model).sites)
    assert {s.role for s in sites} == {"layers.*.self_attn.in_proj", "layers.*.self_attn.out_proj",
                                       "layers.*.linear1", "layers.*.linear2"}
    assert {s.location for s in sites} == {"layers_0", "layers_1"}
    units = {u.name: u.parts for u in find_sites(gm).units}
    assert units == {"layers.0.self_attn": ("layers.0.self_attn.in_proj", "layers.0.self_attn.out_proj"),
                     "layers.1.self_attn": ("layers.1.self_attn.in_proj", "layers.1.self_attn.out_proj"),
                     "layers.0.mlp": ("layers.0.linear1", "layers.0.linear2"),
                     "layers.1.mlp": ("layers.1.linear1", "layers.1.linear2")}
    plan = lfpass.analyze(gm, FusionConfig(target_ratio=1.5, ratio_scope="layers"))
    assert plan.reached and len(plan.groups) >= 2
    fused = fuse_and_check(gm, plan, x)

    def weight(name):
        return fused.get_parameter(f"{name}_weight" if name.endswith("in_proj") else f"{name}.weight")

    for group in plan.groups:
        anchor, other = group.members
        assert weight(anchor) is weight(other)


@pytest.mark.parametrize("frontend", ["module", "symbolic_trace", "export"])
def test_a_layer_whose_bias_is_another_layers_is_not_a_site(frontend):
    """Sharing such a layer would save less than a whole site, so the count would lie."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)).eval()
    model[1].bias = model[0].bias
    x = torch.randn(2, 8)
    gm = {
        "module": lambda: model,
        "symbolic_trace": lambda: torch.fx.symbolic_trace(model),
        "export": lambda: torch.export.export(model, (x,)).module(),
    }[frontend]()
    assert [s.name for s in find_sites(gm).sites] == ["0", "2"]
    plan = lfpass.analyze(gm, FusionConfig(target_ratio=1.1))
    assert [g.members for g in plan.groups] == [("0", "2")]
    fuse_and_check(gm, plan, x)
