"""The similarity heatmap a person reads: one shared, labelled colour scale; layer indices as
ticks; fused pairs outlined; panels sized by their layer count."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.patches import Rectangle
from PIL import Image

from lfpass.core.plan import Candidate, FusionGroup, FusionPlan
from lfpass.core.sites import ClassKey, make_signature
from lfpass.report import heatmap_figure, layer_labels, write_heatmap

ROLES = ("attention.self.query", "attention.self.key", "intermediate.dense")


def fake_plan(layers: int, roles=ROLES[:1], metric: str = "cosine", fused=((0, 1),), scale: float = 1.0,
              offset: float = 0.0) -> FusionPlan:
    """A plan over ``layers`` layers per role (BERT names), neighbours alike, ``fused`` groups
    (by layer index) in every role; scores ``offset + scale * similarity``."""
    rng = np.random.default_rng(0)
    classes, candidates, groups = [], [], []
    for k, role in enumerate(roles):
        key = ClassKey("linear", make_signature(shape=(64, 64), bias=True, layout="out_in", dtype="torch.float32"),
                       f"encoder.layer.*.{role}")
        names = tuple(f"encoder.layer.{i}.{role}" for i in range(layers))
        classes.append((key, names))
        for i in range(layers):
            for j in range(i + 1, layers):
                near = 0.6 if j - i == 1 else 0.0
                score = offset * (k + 1) + scale * (near + rng.normal(0.0, 0.02))
                candidates.append(Candidate(names[i], names[j], float(score)))
        groups += [FusionGroup(tuple(names[m] for m in g), "mean", 0.6, key, 64 * 65) for g in fused]
    saved = sum(g.saved for g in groups)
    return FusionPlan(groups=tuple(groups), metric=metric, scope="model", params_before=10**6,
                      params_after=10**6 - saved, layer_params_before=10**6, layer_params_after=10**6 - saved,
                      max_ratio=2.0, candidates=tuple(candidates), classes=tuple(classes))


def _panels(fig) -> list:
    return [ax for ax in fig.axes if ax.images and not hasattr(ax, "_colorbar")]


def _colorbars(fig) -> list:
    return [ax for ax in fig.axes if hasattr(ax, "_colorbar")]


def _outlined(ax) -> set[tuple[int, int]]:
    """(row, column) of every outlined cell."""
    return {(round(p.get_y() + 0.42), round(p.get_x() + 0.42)) for p in ax.patches if isinstance(p, Rectangle)}


def test_a_24_layer_plan_renders_readably(tmp_path):
    plan = fake_plan(24, fused=((0, 1), (5, 6, 7)))
    path = write_heatmap(plan, tmp_path / "h.png")
    width, height = Image.open(path).size
    assert 600 <= width <= 2200 and 600 <= height <= 2200
    fig = heatmap_figure(plan)
    try:
        (panel,) = _panels(fig)
        (bar,) = _colorbars(fig)
        labels = [t.get_text() for t in panel.get_xticklabels()]
        assert labels == [str(i) for i in range(24)]  # the layer index, every layer
        assert [t.get_text() for t in panel.get_yticklabels()] == labels
        assert bar._colorbar.mappable.norm.vmin == -1 and bar._colorbar.mappable.norm.vmax == 1  # cosine: fixed
        assert "cosine" in bar.get_ylabel() and "similarity" in bar.get_ylabel()
        fig.canvas.draw()
        assert bar.yaxis.get_offset_text().get_text() == ""
        assert panel.images[0].norm.vmin == -1 and panel.images[0].norm.vmax == 1  # the same scale
        pairs = {(0, 1), (1, 0)} | {(i, j) for i in (5, 6, 7) for j in (5, 6, 7) if i != j}
        assert _outlined(panel) == pairs
        side = panel.get_position().width * fig.get_figwidth()
        assert 5.0 <= side <= 8.0  # inches: a cell about 0.3 in
    finally:
        plt.close(fig)


def test_a_2_layer_class_is_a_small_panel(tmp_path):
    plan = fake_plan(2)
    width, height = Image.open(write_heatmap(plan, tmp_path / "h.png")).size
    assert width <= 700 and height <= 700
    fig = heatmap_figure(plan)
    try:
        (panel,) = _panels(fig)
        assert panel.get_position().width * fig.get_figwidth() <= 3.0
        assert [t.get_text() for t in panel.get_xticklabels()] == ["0", "1"]
        assert len(_colorbars(fig)) == 1
    finally:
        plt.close(fig)


def test_many_classes_share_one_colour_bar_over_their_common_range():
    plan = fake_plan(6, roles=ROLES, metric="wasserstein", scale=3.0, offset=-2.0)
    fig = heatmap_figure(plan)
    try:
        panels = _panels(fig)
        assert len(panels) == 3 and len(_colorbars(fig)) == 1
        norms = {(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in panels}
        assert len(norms) == 1
        ((lo, hi),) = norms
        scores = [c.score for c in plan.candidates]
        assert lo == pytest.approx(min(scores)) and hi == pytest.approx(max(scores))
    finally:
        plt.close(fig)
    fig = heatmap_figure(plan, max_classes=2)
    try:
        assert len(_panels(fig)) == 2
    finally:
        plt.close(fig)


def test_nothing_fusable_still_renders(tmp_path):
    plan = FusionPlan(groups=(), metric="cosine", scope="model", params_before=10, params_after=10,
                      layer_params_before=10, layer_params_after=10, max_ratio=1.0)
    assert Image.open(write_heatmap(plan, tmp_path / "empty.png")).size[0] > 100


def test_layer_labels_are_what_varies_in_the_names():
    assert layer_labels([f"encoder.layer.{i}.attention.self.query" for i in (0, 3, 11)]) == ["0", "3", "11"]
    assert layer_labels(["layer1.0.conv2", "layer2.1.conv2"]) == ["layer1.0", "layer2.1"]
    assert layer_labels(["blocks.0", "blocks.1", "blocks.10"]) == ["0", "1", "10"]
    assert layer_labels(["layer2.0.conv2", "layer2.1.conv1"]) == ["0.conv2", "1.conv1"]
