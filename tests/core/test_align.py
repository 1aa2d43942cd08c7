"""The IR-free alignment core: transforms keep the function, matching recovers copies, links compose."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lfpass.core.align import Link, Move, Space, Transform, align_spaces, match, similarity, transform_space
from lfpass.core.calibration import Calibration, accumulate

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mlp_space(prefix: str, width: int) -> Space:
    return Space(f"{prefix}.fc1", "permute", width, (
        Move("p0.weight", f"{prefix}.fc1.weight", 0, "producer", f"{prefix}.fc1"),
        Move("p0.bias", f"{prefix}.fc1.bias", 0, "bias", f"{prefix}.fc1"),
        Move("c0.weight", f"{prefix}.fc2.weight", 1, "consumer", f"{prefix}.fc2"),
    ), (f"{prefix}.fc1",), (f"{prefix}.fc2",))


def mlp_tensors(prefix: str, d: int, h: int, rng) -> dict[str, np.ndarray]:
    return {f"{prefix}.fc1.weight": rng.standard_normal((h, d)), f"{prefix}.fc1.bias": rng.standard_normal(h),
            f"{prefix}.fc2.weight": rng.standard_normal((d, h))}


def mlp(t: dict, prefix: str, x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ t[f"{prefix}.fc1.weight"].T + t[f"{prefix}.fc1.bias"], 0) @ t[f"{prefix}.fc2.weight"].T


def attention_spaces(prefix: str, width: int, heads: int) -> tuple[Space, Space]:
    qk = Space(f"{prefix}.q:qk", "heads", width, (Move("p0.weight", f"{prefix}.q", 0, "producer"),
                                                  Move("p1.weight", f"{prefix}.k", 0, "producer")),
               (f"{prefix}.q", f"{prefix}.k"), (), heads, tied=f"{prefix}.v:vo")
    vo = Space(f"{prefix}.v:vo", "heads", width, (Move("p0.weight", f"{prefix}.v", 0, "producer"),
                                                  Move("c0.weight", f"{prefix}.o", 1, "consumer")),
               (f"{prefix}.v",), (f"{prefix}.o",), heads, tied=f"{prefix}.q:qk")
    return qk, vo


def attention(t: dict, prefix: str, x: np.ndarray, heads: int) -> np.ndarray:
    def split(w):
        y = x @ w.T
        return y.reshape(x.shape[0], heads, -1).transpose(1, 0, 2)
    q, k, v = (split(t[f"{prefix}.{n}"]) for n in "qkv")
    s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(1, 0, 2).reshape(x.shape[0], -1) @ t[f"{prefix}.o"].T


def attention_tensors(prefix: str, d: int, rng) -> dict[str, np.ndarray]:
    return {f"{prefix}.{n}": rng.standard_normal((d, d)) / np.sqrt(d) for n in "qkvo"}


@FAST
@given(d=st.integers(1, 6), h=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_permutation_keeps_mlp(d, h, seed):
    rng = np.random.default_rng(seed)
    t = mlp_tensors("a", d, h, rng)
    x = rng.standard_normal((5, d))
    before = mlp(t, "a", x)
    transform_space(mlp_space("a", h), Transform(rng.permutation(h)), t)
    np.testing.assert_allclose(mlp(t, "a", x), before, atol=1e-12)


@FAST
@given(heads=st.integers(1, 4), d=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_head_permutation_and_rotation_keep_attention(heads, d, seed):
    rng = np.random.default_rng(seed)
    width = heads * d
    t = attention_tensors("a", width, rng)
    x = rng.standard_normal((6, width))
    before = attention(t, "a", x, heads)
    perm = rng.permutation(heads)
    for space in attention_spaces("a", width, heads):
        rot = np.stack([np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(heads)])
        transform_space(space, Transform(perm, rot), t)
    np.testing.assert_allclose(attention(t, "a", x, heads), before, atol=1e-10)


def test_permuted_copy_recovered_exactly():
    rng = np.random.default_rng(0)
    t = mlp_tensors("a", 6, 20, rng)
    b = {k.replace("a.", "b."): v.copy() for k, v in t.items()}
    t.update(b)
    perm = rng.permutation(20)
    transform_space(mlp_space("b", 20), Transform(perm), t)
    transform, used = match(mlp_space("a", 20), mlp_space("b", 20), t)
    assert used == "weights"
    assert np.array_equal(perm[transform.perm], np.arange(20))  # the inverse of what scrambled it
    report = align_spaces([mlp_space("a", 20), mlp_space("b", 20)], [Link("a.fc1", "b.fc1", "test")], t)
    (a,) = report.aligned
    assert a.after == pytest.approx(1.0, abs=1e-12) and a.before < 0.5 and a.floor < a.after
    for name in ("fc1.weight", "fc1.bias", "fc2.weight"):
        assert np.array_equal(t[f"a.{name}"], t[f"b.{name}"])


def test_rotated_heads_recovered_with_one_head_order():
    rng = np.random.default_rng(1)
    heads, d = 4, 8
    t = attention_tensors("a", heads * d, rng)
    t.update({k.replace("a.", "b."): v.copy() for k, v in t.items()})
    a_spaces, b_spaces = attention_spaces("a", heads * d, heads), attention_spaces("b", heads * d, heads)
    perm = rng.permutation(heads)
    for space in b_spaces:
        rot = np.stack([np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(heads)])
        transform_space(space, Transform(perm, rot), t)
    x = rng.standard_normal((5, heads * d))
    before = attention(t, "b", x, heads)
    links = [Link(a.key, b.key, "test") for a, b in zip(a_spaces, b_spaces)]
    report = align_spaces([*a_spaces, *b_spaces], links, t)
    assert len(report.aligned) == 2
    for a in report.aligned:
        assert a.after == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(attention(t, "b", x, heads), before, atol=1e-10)
    np.testing.assert_allclose(t["b.q"], t["a.q"], atol=1e-9)


def test_unlinked_partner_follows_head_order():
    """Aligning only qk must reorder vo's heads too, or Q/K heads lose their V heads."""
    rng = np.random.default_rng(2)
    heads, d = 4, 4
    t = attention_tensors("a", heads * d, rng)
    t.update(attention_tensors("b", heads * d, rng))
    x = rng.standard_normal((5, heads * d))
    before = attention(t, "b", x, heads)
    a_spaces, b_spaces = attention_spaces("a", heads * d, heads), attention_spaces("b", heads * d, heads)
    align_spaces([*a_spaces, *b_spaces], [Link(a_spaces[0].key, b_spaces[0].key, "test")], t)
    np.testing.assert_allclose(attention(t, "b", x, heads), before, atol=1e-10)


def test_activation_matching_moves_calibration():
    rng = np.random.default_rng(3)
    d, h = 5, 12
    t = mlp_tensors("a", d, h, rng)
    t.update({k.replace("a.", "b."): v.copy() for k, v in t.items()})
    perm = rng.permutation(h)
    transform_space(mlp_space("b", h), Transform(perm), t)
    x = rng.standard_normal((200, d))
    hidden = {p: np.maximum(x @ t[f"{p}.fc1.weight"].T + t[f"{p}.fc1.bias"], 0) for p in "ab"}
    cal = Calibration()
    for p in "ab":
        cal.layers[f"{p}.fc1.weight"] = accumulate(None, x)
        cal.layers[f"{p}.fc2.weight"] = accumulate(None, hidden[p])
    cal.cross[("a.fc2.weight", "b.fc2.weight")] = hidden["a"].T @ hidden["b"]
    report = align_spaces([mlp_space("a", h), mlp_space("b", h)], [Link("a.fc1", "b.fc1", "t")], t, "activations", cal)
    (a,) = report.aligned
    assert a.matched_by == "activations" and a.after == pytest.approx(1.0, abs=1e-12)
    moved = np.maximum(x @ t["b.fc1.weight"].T + t["b.fc1.bias"], 0)
    np.testing.assert_allclose(cal["b.fc2.weight"].gram, moved.T @ moved, atol=1e-9)  # statistics moved along


def test_input_gram_matching_without_cross():
    rng = np.random.default_rng(4)
    t = mlp_tensors("a", 5, 10, rng)
    t.update({k.replace("a.", "b."): v.copy() for k, v in t.items()})
    transform_space(mlp_space("b", 10), Transform(rng.permutation(10)), t)
    x = rng.standard_normal((50, 5))
    cal = Calibration({"a.fc1.weight": accumulate(None, x), "b.fc1.weight": accumulate(None, x)})
    report = align_spaces([mlp_space("a", 10), mlp_space("b", 10)], [Link("a.fc1", "b.fc1", "t")], t, "activations", cal)
    assert report.aligned[0].matched_by == "input-gram" and report.aligned[0].after == pytest.approx(1.0)


def test_components_align_in_bfs_order_each_space_once():
    rng = np.random.default_rng(5)
    t = {}
    spaces = [mlp_space(p, 8) for p in "abc"]
    for p in "abc":
        t.update(mlp_tensors(p, 4, 8, rng))
    links = [Link("b.fc1", "c.fc1", "x"), Link("a.fc1", "b.fc1", "y"), Link("a.fc1", "c.fc1", "z")]
    report = align_spaces(spaces, links, t)
    assert [(a.space, a.anchor) for a in report.aligned] == [("b.fc1", "a.fc1"), ("c.fc1", "a.fc1")]


def test_spaces_not_alike_are_skipped_with_reason():
    rng = np.random.default_rng(6)
    t = {**mlp_tensors("a", 4, 8, rng), **mlp_tensors("b", 4, 6, rng)}
    report = align_spaces([mlp_space("a", 8), mlp_space("b", 6)], [Link("a.fc1", "b.fc1", "x")], t)
    assert report.aligned == [] and "permute 8" in report.skipped[0].reason and report.changed == set()


def test_similarity_of_identical_is_one():
    rng = np.random.default_rng(7)
    t = mlp_tensors("a", 3, 4, rng)
    assert similarity(mlp_space("a", 4), mlp_space("a", 4), t) == pytest.approx(1.0)
