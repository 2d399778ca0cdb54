"""DL verification off the calibration distribution: real text and the on-policy windows must both pass, or,
without real text, the on-policy bound must clear the target by ``real_text_margin``."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_TEXT, need


def _dl(stories_dir, tmp_path, **kw):
    from slq.search.session import search

    args = dict(calib_samples=8, seq_len=64, sens_windows=4, verify_windows=8, confirm_windows=8, group_size=32,
                workdir=tmp_path / "work", progress=False, baselines=(), frontier=False, target="dl", ear=0.99,
                bitwidths=(3, 4, 5, 6, 8, 16), map_bits=(4, 6, 8), max_rounds=3)
    args.update(kw)
    return search(str(stories_dir), **args)


def test_dl_with_real_text_accepts_only_when_real_and_generated_windows_pass(stories_dir, tmp_path):
    rep = _dl(stories_dir, tmp_path, verify_data=str(need(TINY_TEXT)))
    ver = rep["verification"]
    assert ver["real_text"] == str(need(TINY_TEXT)) and ver["on_policy_windows"] == 8 and ver["margin"] == 0.0
    for r in rep["rounds"]:
        real = r["measured"]["ear"]["ci95"][0] >= 0.99 and r.get("confirmation", {}).get("passed", False)
        assert ("on_policy" in r) == real  # the on-policy windows are measured once real text has passed
        passed = real and r["on_policy"]["passed"]
        assert r["accepted"] == passed
        if "on_policy" in r:
            assert r["on_policy"]["passed"] == (r["on_policy"]["measured"]["ear"]["ci95"][0] >= 0.99)
    assert [t["round"] for t in ver["on_policy_tries"]] == [r["round"] for r in rep["rounds"] if "on_policy" in r]
    if rep["verified"]:
        assert rep["on_policy"]["passed"] and rep["measured"]["ear"]["ci95"][0] >= 0.99


def test_generated_calibration_is_the_same_with_and_without_real_text(stories_dir, tmp_path):
    """The on-policy windows come from the calibration's own sampling pass (sequence i depends only on the seed
    and i), so adding real text changes neither the calibration windows nor the bank."""
    from slq.search.config import SearchConfig
    from slq.search.session import SearchSession

    base = dict(calib_samples=6, seq_len=48, sens_windows=2, verify_windows=3, confirm_windows=0, group_size=32,
                bitwidths=(4, 8), map_bits=(4, 8), estimator="fisher", target="bits", bits=6.0)
    a = SearchSession(str(stories_dir), SearchConfig.from_settings(workdir=tmp_path / "a", **base), progress=False)
    b = SearchSession(str(stories_dir), SearchConfig.from_settings(workdir=tmp_path / "b", verify_data=str(
        need(TINY_TEXT)), **base), progress=False)
    assert torch.equal(a.calib_w, b.calib_w)
    assert torch.equal(a.verify_w, b.policy_w)  # the held-out generated windows are the on-policy ones
    assert a.policy_w is None and not torch.equal(a.verify_w[:, :8], b.verify_w[:, :8])
    assert (tmp_path / "a" / "bank" / "bank.json").read_text().split('"settings"')[0] == \
        (tmp_path / "b" / "bank" / "bank.json").read_text().split('"settings"')[0]


def test_without_real_text_the_bound_must_clear_the_margin(stories_dir, tmp_path):
    rep = _dl(stories_dir, tmp_path, real_text_margin=0.004)
    ver = rep["verification"]
    assert ver["threshold"] == pytest.approx(0.994) and ver["margin"] == 0.004 and ver["on_policy_windows"] == 0
    for r in rep["rounds"]:
        lb = r["measured"]["ear"]["ci95"][0]
        assert ("confirmation" in r) == (lb >= 0.994)
        assert r["accepted"] == (lb >= 0.994 and r["confirmation"]["measured"]["ear"]["ci95"][0] >= 0.994)


def test_real_text_margin_is_validated():
    from slq.search.config import SearchConfig
    from slq.util.errors import ConfigError

    with pytest.raises(ConfigError, match="real_text_margin"):
        SearchConfig(real_text_margin=0.02)  # ear 0.99 + 0.02 > 1
    with pytest.raises(ConfigError, match="real_text_margin"):
        SearchConfig(real_text_margin=-0.001)
