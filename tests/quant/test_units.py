import warnings

import pytest
import torch

from slq.util.errors import SlqError
from slq.quant.pipeline import layer_spec, quantizable_linears, quantize_model
from slq.quant.spec import QuantSpec
from slq.quant.units import FUSED_FAMILIES, bits_per_param, build_units, storage_bits, unit_specs

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, head_dim=16)
FUSED = {"attn.qkv": [{"q_proj", "k_proj", "v_proj"}, {"qkv_proj"}],
         "mlp.gate_up": [{"gate_proj", "up_proj"}, {"gate_up_proj"}],
         "attn.o": [{"o_proj"}], "mlp.down": [{"down_proj"}]}


def tiny_model(family: str, **overrides):
    """A randomly initialised 2-layer model of the family, built offline from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**TINY, **overrides}))


def leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def check_partition(model, units):
    """Every quantizable linear in exactly one unit, in model order; shapes add up."""
    linears = quantizable_linears(model)
    members = [m for u in units for m in u.members]
    assert sorted(members) == sorted(linears) and len(set(members)) == len(members)
    firsts = [list(linears).index(u.members[0]) for u in units]
    assert firsts == sorted(firsts)
    assert len({u.name for u in units}) == len(units)
    for u in units:
        assert u.n_params == sum(linears[m].weight.numel() for m in u.members)
        assert {linears[m].in_features for m in u.members} == {u.K}
    assert sum(u.n_params for u in units) == sum(lin.weight.numel() for lin in linears.values())


def check_fused(model, units):
    """Four units per layer, each grouping exactly the projections of one fused GEMM."""
    prefix = units[0].name.rsplit(".", 3)[0]  # "model.layers"
    n_layers = model.config.num_hidden_layers
    assert len(units) == 4 * n_layers
    for u in units:
        assert u.name == f"{prefix}.{u.layer}.{u.kind}"
        assert {leaf(m) for m in u.members} in FUSED[u.kind]
        assert all(m.startswith(f"{prefix}.{u.layer}.") for m in u.members)
    assert sorted(u.kind for u in units) == sorted(list(FUSED) * n_layers)


def test_stories_units_fuse_qkv_and_gate_up(stories):
    model, _ = stories
    units = build_units(model)
    check_partition(model, units)
    check_fused(model, units)
    u = units[0]
    assert u.name == "model.layers.0.attn.qkv" and u.layer == 0 and u.K == 64
    assert u.members == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert u.n_params == 64 * 64 + 2 * 32 * 64  # 8 query heads, 4 kv heads of dim 8
    assert [x.K for x in units[:4]] == [64, 64, 64, 172]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "llama"])
def test_families_fuse_qkv_and_gate_up(family):
    model = tiny_model(family)
    assert model.config.model_type in FUSED_FAMILIES
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known family warns about nothing
        units = build_units(model)
    check_partition(model, units)
    check_fused(model, units)


def test_phi3_already_fused_linears_map_to_units():
    model = tiny_model("phi3", pad_token_id=0, bos_token_id=1, eos_token_id=1)
    units = build_units(model)
    check_partition(model, units)
    check_fused(model, units)
    assert all(len(u.members) == 1 for u in units)


@pytest.mark.parametrize("family", ["qwen3", "gemma"])
def test_linear_mode_gives_one_unit_per_linear(family):
    model = tiny_model(family)
    units = build_units(model, mode="linear")
    check_partition(model, units)
    assert [u.members for u in units] == [(n,) for n in quantizable_linears(model)]
    assert all(u.name == u.members[0] and u.name.endswith(u.kind) for u in units)


def test_unknown_family_warns_and_falls_back_to_one_unit_per_linear():
    model = tiny_model("gpt_neox")
    with pytest.warns(UserWarning, match="'gpt_neox' has no known fused projections"):
        units = build_units(model)
    check_partition(model, units)
    assert len(units) == len(quantizable_linears(model))
    assert units[0].kind == "attention.query_key_value"


def test_members_with_different_inputs_are_not_fused():
    model = tiny_model("llama")
    model.model.layers[1].self_attn.k_proj = torch.nn.Linear(32, 32, bias=False)  # K = 32, not 64
    with pytest.warns(UserWarning, match="differ in in_features"):
        units = build_units(model)
    check_partition(model, units)
    split = [u for u in units if u.layer == 1 and u.kind.startswith("self_attn.")]
    assert [u.kind for u in split] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


def test_unknown_mode_is_an_error(stories):
    with pytest.raises(SlqError, match="unknown unit mode"):
        build_units(stories[0], mode="grouped")


@pytest.mark.parametrize("group_size", [None, 32, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_bits_accounting_matches_the_layer_plan(stories, group_size, symmetric):
    """K = 172 (down_proj) has no power-of-two divisor: per-channel; K = 64 gets min(G, 64)."""
    model, _ = stories
    linears = quantizable_linears(model)
    for u in build_units(model):
        assert bits_per_param(u, 16, group_size, symmetric) == 16.0
        assert storage_bits(u, 16, group_size, symmetric) == 16 * u.n_params
        for bits in range(2, 9):
            plans = [layer_spec(m, linears[m], QuantSpec(bits, group_size, symmetric), "rtn") for m in u.members]
            assert all(p.bits_per_param == bits_per_param(u, bits, group_size, symmetric) for p in plans)
            size = storage_bits(u, bits, group_size, symmetric)
            assert isinstance(size, int)
            assert size == pytest.approx(sum(p.n_params * p.bits_per_param for p in plans), rel=1e-12)


def test_unit_specs_expand_to_members_and_keep_16_bit_units_out(stories):
    model, _ = stories
    units = build_units(model)
    bits = {u.name: (16 if u.kind == "mlp.down" else 2 + i % 7) for i, u in enumerate(units)}
    specs = unit_specs(units, bits, 128, False)
    for u in units:
        for m in u.members:
            if bits[u.name] == 16:
                assert m not in specs
            else:
                assert specs[m] == QuantSpec(bits[u.name], 128, False)
    assert len(specs) == sum(len(u.members) for u in units if u.kind != "mlp.down")


def test_unit_specs_reject_a_mismatched_allocation(stories):
    units = build_units(stories[0])
    bits = {u.name: 4 for u in units}
    with pytest.raises(SlqError, match="missing"):
        unit_specs(units, {k: v for k, v in list(bits.items())[1:]}, 128, False)
    with pytest.raises(SlqError, match="unknown"):
        unit_specs(units, {**bits, "model.layers.9.attn.qkv": 4}, 128, False)
    with pytest.raises(SlqError, match="bits must be"):
        unit_specs(units, {**bits, units[0].name: 9}, 128, False)


def test_quantized_plan_stores_exactly_the_allocated_bits(stories):
    """unit_specs -> quantize_model: the plan's total bits equal the sum of storage_bits."""
    model, _ = stories
    units = build_units(model)
    bits = {u.name: 2 + i % 7 for i, u in enumerate(units)}
    result = quantize_model(model, specs=unit_specs(units, bits, 128, False), method="rtn", clip=False,
                            progress=False)
    assert result.plan.total_bits == pytest.approx(sum(storage_bits(u, bits[u.name], 128, False) for u in units), rel=1e-12)


def test_unit_specs_take_choices_with_their_own_group_sizes(stories):
    from slq.quant.units import KEEP, Choice

    units = build_units(stories[0])
    alloc = {u.name: (KEEP if i == 0 else Choice(4, None) if u.K == 172 else Choice(3 + i % 5, (32, 16)[i % 2]))
             for i, u in enumerate(units)}
    specs = unit_specs(units, {k: str(c) for k, c in alloc.items()}, 128, True)
    for u in units:
        c = alloc[u.name]
        for m in u.members:
            assert (m not in specs) if c.keep else specs[m] == QuantSpec(c.bits, c.group, True)
