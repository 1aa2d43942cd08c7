import dataclasses
import math
import tomllib
from pathlib import Path

import pytest

from lfpass.core.config import FusionConfig, from_mapping, load_pipeline
from lfpass.core.errors import ConfigError

PASSES = Path(__file__).resolve().parents[2] / "passes"
SHIPPED = sorted(PASSES.glob("*.toml"))
OPTIONAL = {"target_ratio", "threshold", "max_group_size", "max_overshoot"}  # TOML writes "none" for unset


def test_pipelines_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"default", "lossless", "paper"}


def _as_config_value(key, value):
    """A TOML value as FusionConfig holds it: "none" (or false) unsets an optional field; lists are tuples."""
    if key in OPTIONAL and (value is False or value == "none"):  # not `in`: 0 == False
        return None
    return tuple(value) if isinstance(value, list) else value


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_pipelines_load(path):
    """Each key the file sets is the loaded config's value (the file read here with
    tomllib, not through the loader); each field it leaves out keeps its default."""
    data = tomllib.loads(path.read_text())
    assert str(data.pop("description", "")).strip(), f"{path.name} has no description"
    train = data.pop("train", None)
    if train is not None:  # a retraining recipe: its [train] section loads too
        from lfpass.recipe import load_recipe

        assert load_recipe(path)[1].model == train["model"]
    config = load_pipeline(path)
    assert config.name == data.pop("name", path.stem)
    expected = {key: _as_config_value(key, value) for key, value in data.items()}
    assert {key: getattr(config, key) for key in expected} == expected
    defaults = {f.name: f.default for f in dataclasses.fields(FusionConfig) if f.name not in {*expected, "name"}}
    assert {key: getattr(config, key) for key in defaults} == defaults


def test_paper_pipeline_is_the_papers_recipe():
    paper = load_pipeline(PASSES / "paper.toml")
    assert (paper.metric, paper.merge, paper.cross_role, paper.target_ratio) == ("cov", "mean", False, 3.33)


@pytest.mark.parametrize(
    "text, message",
    [
        ('metirc = "cov"', "unknown key 'metirc'"),
        ('metric = "nope"', "metric: unknown 'nope'"),
        ('merge = "avg"', "merge: unknown rule 'avg'"),
        ("target_ratio = 0.5", "target_ratio: must be a finite number >= 1"),
        ("target_ratio = nan", "target_ratio"),
        ("cross_role = 1", "cross_role: must be true or false"),
        ('kinds = "linear"', "kinds: must be a list"),
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
    c = FusionConfig().replace(metric="kl", threshold=0.9, target_ratio=None)
    assert c.metric == "kl" and c.target_ratio is None  # None is a value in the API: it unsets the target
    with pytest.raises(ConfigError, match="set at least one"):
        FusionConfig().replace(target_ratio=None)
    t = from_mapping({"threshold": 0.9, "target_ratio": "none"})
    assert t.target_ratio is None and t.threshold == 0.9
    with pytest.raises(ConfigError):
        FusionConfig(target_ratio=math.inf)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seed": -1}, "seed: must be an integer from 0"),
        ({"seed": 1.5}, "seed: must be an integer"),
        ({"seed": True}, "seed: must be an integer"),
        ({"cross_role": "yes"}, "cross_role: must be true or false"),
        ({"include": "*fc*"}, "include: must be a list of strings"),
        ({"exclude": ["a", 3]}, "exclude: must be a list of strings"),
        ({"metric": 3}, "metric: must be a string"),
        ({"max_overshoot": -0.1}, "max_overshoot: must be a finite number >= 0"),
        ({"min_params": -1}, "min_params: must be an integer >= 0"),
    ],
)
def test_api_config_is_checked_like_a_pipeline(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FusionConfig(**kwargs)


def test_lists_become_tuples_so_configs_compare_and_hash():
    c = FusionConfig(include=["*fc*"], kinds=["linear"])
    assert c.include == ("*fc*",) and c == FusionConfig(include=("*fc*",), kinds=("linear",))
    hash(c)


def test_fuse_threshold_only_unsets_the_default_ratio(copies):
    import lfpass

    _, plan = lfpass.fuse(copies, threshold=0.999999, target_ratio=None)
    assert plan.target_ratio is None and len(plan.groups) == 1 and len(plan.groups[0].members) == 3


def test_pipeline_given_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_pipeline(tmp_path)


def test_merge_and_align_are_auto_and_become_data_aware_with_data():
    from lfpass.core.config import FusionConfig

    config = FusionConfig()
    assert (config.merge, config.align) == ("auto", "auto") and config.auto_fields == ("merge", "align", "actions")
    assert (config.merge_rule, config.alignment) == ("mean", "none") and not config.keeps_function
    with_data = config.resolved(True)
    assert (with_data.merge, with_data.align) == ("regmean", "weights") and with_data.keeps_function
    assert config.resolved(False).merge == "mean"
    chosen = FusionConfig(merge="mean", align="none").resolved(True)  # set fields stay as set
    assert (chosen.merge, chosen.align) == ("mean", "none") and not chosen.keeps_function


@pytest.mark.parametrize("field, value, match", [
    ("margin", -1.0, "margin"), ("pooling", "max", "pooling"), ("error_output", "", "error_output"),
])
def test_how_an_error_is_measured_is_checked(field, value, match):
    from lfpass.core.config import FusionConfig

    with pytest.raises(ConfigError, match=match):
        FusionConfig(**{field: value})
    assert FusionConfig(pooling="mean", margin=0.0).measuring == ("pooling", "margin")


def test_the_plan_menu_is_the_default_with_data_and_something_to_aim_at():
    from lfpass.core.config import ACTIONS, FusionConfig

    assert FusionConfig().menu(True) == ACTIONS and FusionConfig().uses_menu(True)
    assert FusionConfig().menu(False) == ("tie",) and not FusionConfig().uses_menu(False)
    for tie_only in ({"align": "weights"}, {"residual_rank": 2}, {"granularity": "block"},
                     {"target_ratio": None, "threshold": 0.5}):
        assert FusionConfig(**tie_only).menu(True) == ("tie",), tie_only  # options only the tie planners honour
    assert FusionConfig(actions="basis, lowrank").actions == ("basis", "lowrank")
    assert FusionConfig(actions=["lowrank"]).uses_menu(False)  # named: without data too (plain SVD)
    for bad, why in (("bases", "unknown 'bases'"), (3, "must be 'auto' or a list"), ([], "must be 'auto' or a list")):
        with pytest.raises(ConfigError, match=why):
            FusionConfig(actions=bad)
