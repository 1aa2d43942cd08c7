import math
from pathlib import Path

import pytest

from lfpass.config import FusionConfig, from_mapping, load_pipeline
from lfpass.errors import ConfigError

PASSES = Path(__file__).resolve().parent.parent / "passes"


@pytest.mark.parametrize("path", sorted(PASSES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_pipelines_load(path):
    config = load_pipeline(path)
    assert config.name == path.stem


def test_paper_pipeline_is_the_papers_recipe():
    paper = load_pipeline(PASSES / "paper.toml")
    assert (paper.metric, paper.merge, paper.cross_role, paper.target_ratio) == ("cov", "mean", False, 3.33)


@pytest.mark.parametrize(
    "text, message",
    [
        ('metirc = "cov"', "unknown key 'metirc'"),
        ('metric = "nope"', "metric: unknown 'nope'"),
        ('merge = "avg"', "merge: unknown rule 'avg'"),
        ("target_ratio = 0.5", "target_ratio: must be a finite number > 1"),
        ("target_ratio = nan", "target_ratio"),
        ("cross_role = 1", "cross_role must be true or false"),
        ('kinds = "linear"', "kinds must be a list"),
        ('kinds = ["lstm"]', "kinds: unknown"),
        ('ratio_scope = "all"', "ratio_scope: must be one of"),
        ("max_group_size = 1", "max_group_size: must be an integer >= 2"),
        ('target_ratio = "none"', "set at least one"),
        ("metric = [", "not valid TOML"),
    ],
)
def test_bad_pipeline_is_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_pipeline(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_pipeline(tmp_path):
    with pytest.raises(ConfigError, match="no such pipeline"):
        load_pipeline(tmp_path / "absent.toml")


def test_replace_and_threshold_only():
    c = FusionConfig().replace(metric="kl", target_ratio=None)
    assert c.metric == "kl" and c.target_ratio == 2.0  # None means "not given"
    t = from_mapping({"threshold": 0.9, "target_ratio": "none"})
    assert t.target_ratio is None and t.threshold == 0.9
    with pytest.raises(ConfigError):
        FusionConfig(target_ratio=math.inf)
