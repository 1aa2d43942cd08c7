"""Output errors per sample, the margin a budget keeps, and what an error is measured on."""

from __future__ import annotations

import numpy as np
import pytest

from lfpass.core.errors import ConfigError
from lfpass.core.quality import Readout, output_error, sample_errors, upper_bound


def _batches(seed: int, shape=(4, 6)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(3)]


@pytest.mark.parametrize("metric", ["cosine", "top1", "accuracy"])
def test_the_error_is_the_mean_of_the_per_sample_errors(metric):
    ref, out = _batches(0, (4, 5, 3)), _batches(1, (4, 5, 3))
    labels = [np.random.default_rng(2).integers(0, 3, (4, 5)) for _ in range(3)]
    errors = sample_errors(ref, out, metric, labels)
    assert errors.shape == (12,)
    assert output_error(ref, out, metric, labels) == pytest.approx(errors.mean())
    if metric == "top1":  # per sample: the share of its 5 positions whose choice changed
        changed = np.concatenate([(r.argmax(-1) != o.argmax(-1)).mean(1) for r, o in zip(ref, out)])
        np.testing.assert_allclose(errors, changed)


def test_a_broken_output_is_the_largest_error_for_every_sample():
    ref = _batches(0)
    out = [b.copy() for b in ref]
    out[1][0, 0] = np.nan
    assert (sample_errors(ref, out, "cosine") == 2.0).all()


def test_the_margin_is_standard_errors_of_the_mean():
    errors = np.array([0.01, 0.03, 0.02, 0.04])
    se = errors.std(ddof=1) / 2
    assert upper_bound(errors, 0.0) == pytest.approx(errors.mean())
    assert upper_bound(errors, 2.0) == pytest.approx(errors.mean() + 2 * se)
    assert upper_bound(errors[:1], 2.0) == pytest.approx(0.01)  # one sample: no spread to add


def test_a_readout_pools_over_the_mask_or_takes_the_first_position():
    hidden = np.arange(2 * 3 * 2, dtype=np.float64).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    named = {"hidden": hidden, "ids": np.zeros((2, 3), np.int64)}
    np.testing.assert_allclose(Readout(pooling="mean")(named, mask), [[1, 2], [6, 7]])  # padding left out
    np.testing.assert_allclose(Readout(pooling="mean")(named), hidden.mean(1))
    np.testing.assert_allclose(Readout(pooling="cls")(named, mask), hidden[:, 0])
    np.testing.assert_allclose(Readout()(named), hidden.reshape(2, -1))  # every float output, as it is
    np.testing.assert_allclose(Readout(pooling=lambda a, m: a.max(1))(named, mask), hidden.max(1))


def test_a_readout_names_what_it_cannot_read():
    named = {"logits": np.zeros((2, 4))}
    with pytest.raises(ConfigError, match="no output 'hidden'.*logits"):
        Readout("hidden")(named)
    with pytest.raises(ConfigError, match="no positions axis"):
        Readout("logits", "mean")(named)
