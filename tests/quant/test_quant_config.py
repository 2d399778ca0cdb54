"""QuantConfig: one default per setting, one validation, errors that name the field; the entry points take it."""

import copy

import pytest
import torch

from slq.quant.config import QuantConfig
from slq.util.errors import ConfigError, SlqError


def test_act_order_default_follows_the_method():
    assert QuantConfig().act_order is True
    assert QuantConfig(method="rtn").act_order is False
    assert QuantConfig(act_order=False).act_order is False
    assert QuantConfig().with_(method="rtn").act_order is False  # a new method re-derives the default
    assert QuantConfig(act_order=False).with_(damp=0.1).act_order is False  # an explicit choice is kept
    with pytest.raises(ConfigError) as e:
        QuantConfig(method="rtn", act_order=True)
    assert e.value.field == "act_order"


@pytest.mark.parametrize("bad, field", [
    (dict(bits=9), "bits"), (dict(bits=True), "bits"), (dict(group_size=100), "group_size"),
    (dict(group_size=128.0), "group_size"), (dict(method="awq"), "method"), (dict(damp=0), "damp"),
    (dict(damp=float("nan")), "damp"), (dict(calib_samples=0), "calib_samples"), (dict(seq_len=1), "seq_len"),
    (dict(seed=-1), "seed"), (dict(clip=1), "clip"), (dict(device="tpu"), "device"), (dict(method="{x}"), "method"),
    (dict(head_bits=16), "head_bits"), (dict(head_bits=1), "head_bits"), (dict(head_bits=True), "head_bits"),
])
def test_bad_values_name_their_field_and_render_as_a_flag(bad, field):
    with pytest.raises(ConfigError) as e:
        QuantConfig(**bad)
    assert e.value.field == field
    assert str(e.value).startswith(field)  # the library names the field...
    assert e.value.render({field: "--the-flag"}).startswith("--the-flag")  # ...the CLI spells it as its flag


def test_settings_dict_and_spec():
    c = QuantConfig(bits=3, group_size=None, symmetric=True, method="rtn")
    d = c.to_dict()
    assert d["bits"] == 3 and d["group_size"] is None and d["act_order"] is False and QuantConfig(**d) == c
    assert (c.spec.bits, c.spec.group_size, c.spec.symmetric) == (3, None, True)


def test_quantize_model_config_and_keyword_forms_agree(stories):
    """quantize_model(model, config) and the older quantize_model(model, spec, **settings) give the same codes."""
    from slq.quant.pipeline import quantize_model
    from slq.quant.spec import QuantSpec

    model, _ = stories
    a = quantize_model(copy.deepcopy(model), QuantConfig(bits=3, group_size=32, method="rtn", clip=False),
                       progress=False)
    b = quantize_model(model, QuantSpec(3, 32), method="rtn", clip=False, progress=False)
    assert a.qweights.keys() == b.qweights.keys()
    for k in a.qweights:
        assert torch.equal(a.qweights[k].codes, b.qweights[k].codes)
        assert torch.equal(a.qweights[k].scale, b.qweights[k].scale)
    with pytest.raises(SlqError, match="not both"):
        quantize_model(model, QuantConfig(method="rtn"), clip=False, progress=False)


def test_api_quantize_takes_a_config_or_keywords_not_both(stories_dir, tmp_path):
    from slq.api import quantize

    kw = dict(bits=8, method="rtn", group_size=32)
    a = quantize(str(stories_dir), config=QuantConfig(**kw), progress=False)
    b = quantize(str(stories_dir), progress=False, **kw)
    assert a["settings"] == b["settings"] and a["plan"] == b["plan"]
    s = a["settings"]
    assert (s["bits"], s["group_size"], s["method"], s["act_order"], s["attention_hessians"]) == (8, 32, "rtn",
                                                                                                 False, False)
    with pytest.raises(SlqError, match="not both"):
        quantize(str(stories_dir), config=QuantConfig(**kw), bits=4)
    with pytest.raises(SlqError, match="unknown quantization setting"):
        quantize(str(stories_dir), bitz=4)
    with pytest.raises(ConfigError, match="^damp must be in"):  # the library names the field, not a flag
        quantize(str(stories_dir), damp=2.0)
    (tmp_path / "o").mkdir()
    with pytest.raises(ConfigError) as e:
        quantize(str(stories_dir), out=tmp_path / "o", **kw)
    assert e.value.field == "force" and "--force" not in str(e.value)
