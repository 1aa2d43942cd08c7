import numpy as np
import pytest

from lfpass.core.errors import ConfigError
from lfpass.core.metrics import METRICS, get_metric


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 8)).astype(np.float32)
    near = a + 0.01 * rng.normal(size=a.shape).astype(np.float32)
    far = 3.0 * rng.standard_t(2, size=a.shape).astype(np.float32) + 1.0
    return [a, near, a.copy(), far]


@pytest.mark.parametrize("name", sorted(METRICS))
def test_one_scale_higher_is_more_alike(name, weights):
    sim = get_metric(name)(weights)
    assert sim.shape == (4, 4)
    np.testing.assert_allclose(sim, sim.T, atol=1e-9)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-6)
    assert sim[0, 2] == pytest.approx(1.0, abs=1e-6)  # an exact copy scores 1
    assert sim[0, 1] > sim[0, 3]  # a near copy beats an unrelated tensor
    assert np.all(sim <= 1.0 + 1e-9)


def test_cosine_matches_definition(weights):
    a, b = weights[0].ravel(), weights[3].ravel()
    expected = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert get_metric("cosine")(weights)[0, 3] == pytest.approx(expected, rel=1e-5)


def test_euclidean_matches_definition(weights):
    a, b = weights[0].ravel(), weights[1].ravel()
    expected = 1 - np.linalg.norm(a - b) / ((np.linalg.norm(a) + np.linalg.norm(b)) / 2)
    assert get_metric("euclidean")(weights)[0, 1] == pytest.approx(expected, rel=1e-5)


def test_wasserstein_ignores_position():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(32, 32)).astype(np.float32)
    shuffled = rng.permutation(a.ravel()).reshape(a.shape)
    sim = get_metric("wasserstein")([a, shuffled, a * 2])
    assert sim[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert sim[0, 2] < 0.7


def test_unknown_metric_is_named():
    with pytest.raises(ConfigError, match="unknown metric 'nope'"):
        get_metric("nope")
