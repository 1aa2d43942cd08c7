"""Import paths of lfpass 0.1 still work for one release, each with a DeprecationWarning
naming the new place; the names they give are the new modules' own objects."""

from __future__ import annotations

import importlib
import sys

import pytest

from lfpass._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_imports_with_a_warning(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old][0]}"):
        module = importlib.import_module(old)
    new = importlib.import_module(MOVED[old][0])
    public = [n for n in vars(new) if not n.startswith("_") and getattr(new, n) is not None][:5]
    assert public and all(getattr(module, n) is getattr(new, n) for n in public)


def test_the_split_merge_module_serves_every_name_it_had():
    sys.modules.pop("lfpass.merge", None)
    with pytest.warns(DeprecationWarning):
        from lfpass.merge import MERGE_RULES, bit_equal, get_rule, merged_slots, round_to  # noqa: F401
    from lfpass.core import dtypes, merge, rules

    assert get_rule is rules.get_rule and round_to is dtypes.round_to and merged_slots is merge.merged_slots


def test_a_name_that_never_existed_is_still_an_attribute_error():
    sys.modules.pop("lfpass.config", None)
    with pytest.warns(DeprecationWarning):
        module = importlib.import_module("lfpass.config")
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        module.nothing_here  # noqa: B018
