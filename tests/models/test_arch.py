"""slq.models.arch against the models themselves: tiny random transformers models of each family.

Oracles: ``model.named_modules()`` (which linears a layer really has) and forward hooks (which
linears really read the same input tensor)."""

import pytest
import torch
from torch import nn

from slq.models import arch
from slq.util.errors import SlqError

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, head_dim=16)
EXTRA = {"phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=1)}


def tiny(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=128)
    elif family == "gemma3":  # the multimodal wrapper: the text decoder sits under model.language_model
        cfg = AutoConfig.for_model("gemma3", text_config=TINY, vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
            patch_size=14))
    else:
        cfg = AutoConfig.for_model(family, **TINY, **EXTRA.get(family, {}))
    return AutoModelForCausalLM.from_config(cfg).eval()


KNOWN = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3"]


@pytest.mark.parametrize("family", KNOWN)
def test_the_table_names_exactly_the_linears_of_every_layer(family):
    model = tiny(family)
    fam = arch.family(model)
    assert fam is not None and fam.name == family
    layers = arch.decoder_layers(model)
    assert len(layers) == 2 and model.get_submodule(arch.layers_prefix(model)) is layers
    for layer in layers:
        truth = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        assert sorted(fam.roles()) == sorted(truth) and len(truth) == len(set(truth))
    names = arch.decoder_linears(model)
    assert len(names) == 2 * len(fam.roles())
    assert all(model.get_submodule(n) is m for n, m in names.items())
    assert "lm_head" not in names and not any("vision" in n for n in names)
    h = arch.head(model)
    assert h.lm_head is model.get_output_embeddings() and h.norm is model.get_submodule(fam.norm)
    assert {r for r in fam.roles().values()} <= set(arch.ROLES) and set(fam.kinds) == set(arch.KINDS)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "phi3"])
def test_a_kind_groups_exactly_the_linears_that_read_one_input(family):
    """Hook every linear of layer 0: linears of one kind see the same tensor, other kinds another."""
    model = tiny(family)
    fam = arch.family(model)
    layer = arch.decoder_layers(model)[0]
    seen, hooks = {}, []
    for path in fam.roles():
        hooks.append(layer.get_submodule(path).register_forward_pre_hook(
            lambda _m, args, p=path: seen.__setitem__(p, args[0].detach().clone())))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (1, 7)))
    for hk in hooks:
        hk.remove()
    assert set(seen) == set(fam.roles())
    for kind, group in fam.kinds.items():
        paths = list(group)
        for p in paths[1:]:
            assert torch.equal(seen[p], seen[paths[0]]), (kind, p)
        for other, og in fam.kinds.items():
            if other != kind:
                a, b = seen[paths[0]], seen[next(iter(og))]
                assert a.shape != b.shape or not torch.equal(a, b), (kind, other)


def test_names_map_to_roles_and_kinds_in_any_family():
    assert arch.role_of("model.layers.3.self_attn.k_proj") == "k" and arch.kind_of("k_proj") == "attn.qkv"
    assert arch.role_of("x.self_attn.qkv_proj") == "qkv" and arch.kind_of("x.mlp.gate_up_proj") == "mlp.gate_up"
    assert arch.kind_of("model.layers.0.mlp.up_proj") == "mlp.gate_up" and arch.kind_of("mlp.down_proj") == "mlp.down"
    assert arch.role_of("lm_head") is None and arch.kind_of("attention.query_key_value") is None


def test_decode_and_fused_families_are_decided_per_family():
    assert set(arch.DECODE_FAMILIES) == {"llama", "mistral", "qwen2", "qwen3"}
    assert set(arch.FUSED_FAMILIES) == set(KNOWN)
    for fam in KNOWN:
        model = type("M", (nn.Module,), {})()
        model.config = type("C", (), {"model_type": fam})()
        assert arch.unsupported(model, "fused") is None
        assert (arch.unsupported(model, "decode") is None) == (fam in arch.DECODE_FAMILIES)


def test_an_unknown_family_is_reported_and_handled_generically():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_neox", **TINY))
    assert arch.family(model) is None
    assert "'gpt_neox' has no known fused projections" in arch.unsupported(model, "fused")
    assert "got model_type 'gpt_neox'" in arch.unsupported(model, "decode")
    names = arch.decoder_linears(model)  # every nn.Linear of its layers, generically
    truth = [f"gpt_neox.layers.{i}.{n}" for i, layer in enumerate(model.gpt_neox.layers)
             for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    assert list(names) == truth and len(truth) == 8


def test_gpt2_conv1d_layers_are_an_error_not_an_empty_model():
    model = tiny("gpt2")
    assert arch.family(model) is None and len(arch.decoder_layers(model)) == 2
    with pytest.raises(SlqError, match="gpt2.*Conv1D"):
        arch.decoder_linears(model)
