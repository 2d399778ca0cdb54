"""The output head as an allocation unit (SearchConfig.head): its choices are 8-bit and 16, its bank entry is GPTQ
with the final-normed Hessian, and the search writes a checkpoint whose quantized head loads in plain
transformers equal to slq.load."""

from __future__ import annotations

import math

import pytest
import torch

from slq.quant.units import HEAD_KIND, KEEP, Choice, build_units, choice_storage_bits, unit_choices

from conftest import TINY_TEXT, need

GS = 32


def test_head_unit_has_the_shape_and_choices_of_lm_head(stories):
    model, _ = stories
    units = build_units(model, head=True)
    assert [u.kind for u in units].count(HEAD_KIND) == 1 and units[-1].kind == HEAD_KIND
    h = units[-1]
    assert (h.members, h.n_params, h.K, h.layer) == (("lm_head",), 512 * 64, 64, 5)
    assert unit_choices(h, (2, 3, 4, 8), (32, 64)) == [Choice(8, 64), Choice(8, 32), KEEP]  # >= 8, and 16 always
    assert build_units(model)[-1].kind != HEAD_KIND  # off by default


def test_search_with_head_quantizes_it_and_the_checkpoint_loads_in_plain_transformers(stories_dir, tmp_path):
    """A budget of 4.0 bits/param cannot be met with the head at 16 (at least 4.16 with every other unit at 2
    bits), so the search must give the head its 8-bit choice; the accounting includes the head."""
    from transformers import AutoModelForCausalLM

    from slq.runtime.checkpoint import load
    from slq.runtime.qlinear import QuantLinear
    from slq.search.session import search

    rep = search(str(stories_dir), calib=str(need(TINY_TEXT)), calib_samples=12, seq_len=128, sens_windows=6,
                 verify_windows=12, group_size=GS, workdir=tmp_path / "work", out=tmp_path / "out", progress=False,
                 baselines=(), frontier=False, bitwidths=(2, 3, 4, 5, 6, 7, 8, 16), target="bits", bits=4.0,
                 head=True)
    assert rep["allocation"]["lm_head"] == "8g32"
    units = {u["name"]: u for u in rep["units"]}
    assert units["lm_head"]["kind"] == HEAD_KIND
    # bits recounted from the allocation and the units' shapes: the head's 8-bit storage is in the average
    us = build_units(AutoModelForCausalLM.from_pretrained(stories_dir), head=True)
    total = sum(choice_storage_bits(u, Choice.parse(rep["allocation"][u.name]), False) for u in us)
    assert rep["n_params_allocated"] == sum(u.n_params for u in us)
    assert rep["bits_per_param"] == pytest.approx(total / rep["n_params_allocated"], abs=1e-12)
    assert rep["bits_per_param"] <= 4.0
    out = tmp_path / "out"
    ours = load(out)
    assert isinstance(ours.lm_head, QuantLinear) and ours.lm_head.bits == 8
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain(input_ids=ids[:, :3])  # decompress
        assert torch.equal(plain.lm_head.weight, ours.lm_head.dequantized_weight().to(plain.lm_head.weight.dtype))
        assert torch.equal(plain(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert math.isfinite(rep["measured"]["kl"]["mean"])
