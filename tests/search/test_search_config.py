"""SearchConfig: validation names the field; the flat keyword form of ``search`` builds the same config as the
config form; ``run`` dispatches through the target registry."""

from __future__ import annotations

import pytest

from slq.quant.config import QuantConfig
from slq.search import session as session_mod
from slq.search import targets as targets_mod
from slq.search.config import SearchConfig
from slq.search.session import SearchSession, search
from slq.util.errors import ConfigError


@pytest.mark.parametrize("settings, field", [
    (dict(target="xx"), "target"),
    (dict(target="bits"), "bits"),                      # a bits target needs a budget
    (dict(bits=-1.0), "bits"),
    (dict(ear=1.0), "ear"),
    (dict(recovery=0.0), "recovery"),
    (dict(tolerance=1.5), "tolerance"),
    (dict(bitwidths=(3, 9)), "bitwidths"),
    (dict(bitwidths=(16,)), "bitwidths"),               # nothing to quantize to
    (dict(bitwidths="3,4"), "bitwidths"),
    (dict(target="tl", bitwidths=(3, 5, 8)), "bitwidths"),  # the TL anchor is uniform 4-bit
    (dict(units="layer"), "units"),
    (dict(estimator="oracle"), "estimator"),
    (dict(max_rounds=0), "max_rounds"),
    (dict(verify_windows=0), "verify_windows"),
    (dict(sens_windows=40), "sens_windows"),            # more than the 32 calibration windows
    (dict(sens_seq_len=1), "sens_seq_len"),
    (dict(confirm_windows=-1), "confirm_windows"),
    (dict(probe_bits=(5,), bitwidths=(4, 8)), "probe_bits"),
    (dict(tasks="piqa"), "tasks"),
    (dict(task_limit=0), "task_limit"),
    (dict(method="awq"), "method"),                     # QuantConfig's own fields, flat
    (dict(method="rtn", act_order=True), "act_order"),
    (dict(damp=1.0), "damp"),
    (dict(group_size=48), "group_size"),
    (dict(calib_samples=0), "calib_samples"),
    (dict(groups=(128, 48)), "groups"),                 # not a group size
    (dict(groups=(64, 32)), "groups"),                  # must include group_size (128): uniform assemblies use it
    (dict(groups=128), "groups"),
    (dict(head=True, bitwidths=(2, 4, 16)), "head"),    # the head's quantized choice is 8: 8 must be a candidate
    (dict(head=True, estimator="shapley"), "head"),      # Shapley switches the head to every bitwidth
    (dict(head_bits=8), "head_bits"),                    # the uniform pipeline's head bitwidth: not the search's
    (dict(real_text_margin=0.05), "real_text_margin"),  # ear + margin must stay below 1
])
def test_bad_settings_raise_a_config_error_naming_the_field(settings, field):
    with pytest.raises(ConfigError) as e:
        SearchConfig.from_settings(**settings)
    assert e.value.field == field
    assert field in str(e.value)  # the library message names the field ...
    assert "--" not in str(e.value)  # ... never a CLI flag
    assert e.value.render({field: "--flag-x"}).count("--flag-x") >= 1  # the CLI can name its flag instead


def test_unknown_setting_is_a_type_error():
    with pytest.raises(TypeError, match="colour"):
        SearchConfig.from_settings(colour="red")


def test_defaults_and_derived_settings():
    c = SearchConfig()
    assert c.quant.calib_samples == 32 and QuantConfig().calib_samples != 32  # the search's own default
    assert c.confirm_windows == c.verify_windows and c.probe_bits == (4,)
    c2 = c.with_(verify_windows=5, bitwidths=(6, 8, 16))
    assert c2.confirm_windows == 5 and c2.probe_bits == (6,)  # derived again from the new settings
    c3 = SearchConfig.from_settings(confirm_windows=3, probe_bits=(8,)).with_(verify_windows=5)
    assert c3.confirm_windows == 3 and c3.probe_bits == (8,)  # given explicitly: kept
    assert SearchConfig.from_settings(method="rtn").quant.act_order is False
    assert SearchConfig().quant.act_order is True
    assert c.groups == (128,) and c.with_(group_size=64).groups == (64,)  # one group size unless asked
    g = c.with_(groups=(32, None, 128, 64))
    assert g.groups == (None, 128, 64, 32)  # coarse to fine, per-channel first
    assert g.with_(group_size=64).groups == (None, 128, 64, 32)  # given explicitly: kept


class _Stop(Exception):
    pass


def _captured_config(monkeypatch, *args, **kw) -> SearchConfig:
    seen = []

    def fake_session(model, config, **_):
        seen.append(config)
        raise _Stop

    monkeypatch.setattr(session_mod, "SearchSession", fake_session)
    with pytest.raises(_Stop):
        search(*args, **kw)
    return seen[0]


def test_keyword_and_config_forms_of_search_build_the_same_config(monkeypatch, tmp_path):
    flat = dict(target="bits", bits=4.5, tasks=["piqa"], task_limit=20, tolerance=0.02, max_rounds=2, baselines=(4,),
                frontier=False, bitwidths=(3, 4, 8, 16), units="linear", estimator="shapley", group_size=64,
                symmetric=True, method="gptq", calib="generated", calib_samples=16, seq_len=64, sens_windows=4,
                sens_seq_len=32, verify_windows=6, verify_data=None, confirm_windows=2, probe_bits=(8,), orderings=3,
                fisher_draws=2, clip=False, attention=False, act_order=False, damp=0.02, device="cpu", seed=7,
                workdir=str(tmp_path))
    by_keywords = _captured_config(monkeypatch, "m", **flat)
    quant = QuantConfig(group_size=64, symmetric=True, method="gptq", calib="generated", calib_samples=16,
                        seq_len=64, clip=False, attention=False, act_order=False, damp=0.02, device="cpu", seed=7)
    config = SearchConfig(quant=quant, target="bits", bits=4.5, tasks=("piqa",), task_limit=20, tolerance=0.02,
                          max_rounds=2, baselines=(4,), frontier=False, bitwidths=(3, 4, 8, 16), units="linear",
                          estimator="shapley", sens_windows=4, sens_seq_len=32, verify_windows=6, confirm_windows=2,
                          probe_bits=(8,), orderings=3, fisher_draws=2, workdir=str(tmp_path))
    by_config = _captured_config(monkeypatch, "m", config=config)
    assert by_keywords == by_config == config
    assert by_keywords.to_dict() == config.to_dict()
    # every flat setting arrived (none left at its default by a typo in the routing)
    d = {**by_keywords.to_dict()["quant"], **by_keywords.to_dict()}  # the search's bits is the budget
    for k, v in flat.items():
        assert d[k] == (tuple(v) if isinstance(v, list) else v), k
    # keywords change a given config
    mixed = _captured_config(monkeypatch, "m", config=config, bits=5.0, seed=1)
    assert mixed == config.with_(bits=5.0, seed=1) and mixed.quant.seed == 1 and mixed.bits == 5.0
    assert _captured_config(monkeypatch, "m") == SearchConfig()


def test_an_existing_output_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(ConfigError) as e:
        search("m", out=tmp_path)
    assert e.value.field == "force"


def test_run_dispatches_through_the_target_registry(monkeypatch):
    """``run`` calls the registered function of the target, with the session and the config it derived."""
    import torch

    from slq.quant.units import build_units
    from transformers import LlamaConfig, LlamaForCausalLM

    assert targets_mod.TARGETS == {"dl": targets_mod.run_dl, "tl": targets_mod.run_tl, "bits": targets_mod.run_bits}
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    stub = type("Stub", (), {})()
    stub.config, stub.units = SearchConfig(), build_units(tiny)
    calls = []
    for name in targets_mod.TARGETS:
        monkeypatch.setitem(targets_mod.TARGETS, name, lambda s, c, name=name: calls.append((name, s, c)) or name)
    assert SearchSession.run(stub, "dl", ear=0.9) == "dl"
    assert SearchSession.run(stub, "bits", bits=7.5) == "bits"
    assert SearchSession.run(stub, "tl", recovery=0.95) == "tl"
    assert SearchSession.run(stub) == "dl"  # the config's own target
    assert [(n, s) for n, s, _ in calls] == [("dl", stub), ("bits", stub), ("tl", stub), ("dl", stub)]
    assert calls[0][2] == SearchConfig(ear=0.9)
    assert calls[1][2].target == "bits" and calls[1][2].bits == 7.5
    assert calls[2][2].recovery == 0.95
    # a budget the units cannot reach is refused before any target runs
    with pytest.raises(ConfigError, match="below the smallest reachable") as e:
        SearchSession.run(stub, "bits", bits=1.5)
    assert e.value.field == "bits" and len(calls) == 4
