"""The decode engine against its oracle: transformers' own greedy ``model.generate``."""

import pytest
import torch

from slq.runtime.decode import DecodeEngine, generate, supports
from slq.util.errors import SlqError
from conftest import equal_length_ids, hf_greedy

PROMPTS = ["Once upon a time", "The little dog", "Lily went to the park", "Tom had a red ball"]




@pytest.mark.parametrize("prompt", PROMPTS[:3])
@pytest.mark.parametrize("engine_kw", [{}, {"kv_block": 8, "fuse": True}], ids=["eager-exact", "windowed-fused"])
def test_greedy_tokens_equal_hf_generate(stories, prompt, engine_kw):
    model, tok = stories
    ids = tok(prompt, return_tensors="pt").input_ids
    ref = hf_greedy(model, ids, 32)
    out = generate(model, ids, 32, **engine_kw)
    assert out.shape == ref.shape == (1, ids.shape[1] + 32)
    assert torch.equal(out, ref), (tok.decode(out[0]), tok.decode(ref[0]))


def test_windowed_step_logits_equal_a_full_forward(stories):
    """The step with a padded, masked KV window (the CUDA-graph shape) gives the logits of a plain
    full-sequence forward at the same position, across several window lengths."""
    model, tok = stories
    ids = equal_length_ids(tok, PROMPTS[:2])
    eng = DecodeEngine(model, kv_block=8)
    out = eng.generate(ids, 30, eos_token_id=None)
    assert eng.S == 40 and out.shape == (2, ids.shape[1] + 30)
    with torch.no_grad():
        full = model(out.clone()).logits
    torch.testing.assert_close(eng.logits, full[:, -2], rtol=1e-4, atol=1e-4)
    assert torch.equal(full[:, ids.shape[1] - 1:-1].argmax(-1), out[:, ids.shape[1]:])  # every token is greedy


def test_batch_equals_hf_and_each_row_alone_with_eos_stopping(stories):
    """Rows stop at different steps: later tokens are padding and the batch ends when all rows are
    done, exactly like transformers; each row equals its own batch-1 run."""
    model, tok = stories
    ids = equal_length_ids(tok, PROMPTS)
    dot = tok.convert_tokens_to_ids(".")
    ref = hf_greedy(model, ids, 40, eos_token_id=dot, pad_token_id=0)
    out = generate(model, ids, 40, eos_token_id=dot, pad_token_id=0)
    assert torch.equal(out, ref)
    new = out[:, ids.shape[1]:]
    ends = [(row == dot).nonzero()[0, 0].item() for row in new]
    assert len(set(ends)) > 1 and new.shape[1] == max(ends) + 1 < 40  # rows really stop at different steps
    for b in range(len(PROMPTS)):
        alone = generate(model, ids[b:b + 1], 40, eos_token_id=dot, pad_token_id=0)
        assert torch.equal(alone[0], out[b, :alone.shape[1]])
        assert (out[b, alone.shape[1]:] == 0).all()


def test_slq_checkpoint_with_quantlinear_equals_hf_generate(stories, tmp_path):
    from slq.runtime.checkpoint import load, save_checkpoint
    from slq.runtime.qlinear import QuantLinear
    from slq.quant.pipeline import quantize_model
    from slq.quant.spec import QuantSpec

    model, tok = stories
    res = quantize_model(model, QuantSpec(4, 32), method="rtn", progress=False)  # model now holds fake-quant weights
    q = load(save_checkpoint(tmp_path / "ck", model, tok, res.qweights, {"plan": res.plan.to_dict()}))
    assert isinstance(q.model.layers[0].self_attn.q_proj, QuantLinear)
    ids = equal_length_ids(tok, PROMPTS[:2])
    ref = hf_greedy(q, ids, 32)
    assert torch.equal(generate(q, ids, 32), ref)
    assert torch.equal(generate(q, ids, 32, fuse=True, kv_block=16), ref)  # fused QuantLinear q/k/v, gate/up
    assert torch.equal(generate(model, ids, 32), ref)  # the fake-quant nn.Linear model decodes the same


def _tiny(family: str, **extra):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    cfg = cls(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2, **extra)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms and biases away from their trivial init, so they matter
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("family, extra", [
    ("qwen2", {}),  # q/k/v biases
    ("qwen3", {}),  # q_norm / k_norm
    ("mistral", {"sliding_window": None}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32}}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}}),
])
def test_llama_family_architectures_equal_hf_generate(family, extra):
    m = _tiny(family, **extra)
    assert supports(m)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = hf_greedy(m, ids, 24, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(m, ids, 24, eos_token_id=None), ref)
    assert torch.equal(generate(m, ids, 24, eos_token_id=None, kv_block=8, fuse=True), ref)


def test_unsupported_architecture_and_bad_input_give_one_line_errors():
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert not supports(gpt2)
    with pytest.raises(SlqError, match=r"supports llama, mistral, qwen2, qwen3 models; got model_type 'gpt2'") as e:
        DecodeEngine(gpt2)
    assert "\n" not in str(e.value)
    m = _tiny("mistral", sliding_window=16)
    with pytest.raises(SlqError, match="sliding-window attention \\(16 tokens\\)"):
        generate(m, torch.ones(1, 10, dtype=torch.long), 10)
    assert generate(m, torch.ones(1, 10, dtype=torch.long), 7, eos_token_id=None).shape == (1, 17)  # within the window
    with pytest.raises(SlqError, match="input_ids must be"):
        generate(m, torch.ones(1, 0, dtype=torch.long), 4)
    with pytest.raises(SlqError, match="max_new_tokens must be >= 1"):
        generate(m, torch.ones(1, 3, dtype=torch.long), 0)
    with pytest.raises(SlqError, match="cuda_graph=True needs"):
        DecodeEngine(m, cuda_graph=True)


def test_engine_reuses_its_cache_and_reallocates_on_a_new_batch(stories):
    model, tok = stories
    ids = equal_length_ids(tok, PROMPTS[:2])
    eng = DecodeEngine(model)
    a = eng.generate(ids, 12, eos_token_id=None)
    kv = eng.kv
    b = eng.generate(ids, 8, eos_token_id=None)  # fits: same cache tensor, stale tail is never attended
    assert eng.kv is kv and torch.equal(b, a[:, : ids.shape[1] + 8])
    c = eng.generate(ids[:1], 12, eos_token_id=None)
    assert eng.kv is not kv and eng.kv.shape[2] == 1 and torch.equal(c[0], a[0])
    assert eng.stats.decode_steps == 11 and eng.stats.tokens_per_s > 0


def test_api_generate_uses_the_engine_and_falls_back_for_other_families(stories_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    import slq.api as api
    import slq.runtime.decode as dec

    calls = []
    real = dec.DecodeEngine.generate
    monkeypatch.setattr(dec.DecodeEngine, "generate", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    notes = []
    text = api.generate(str(stories_dir), "Once upon a time", max_new_tokens=16, note=notes.append)
    assert calls and not notes
    model, tok = __import__("slq.models.sources", fromlist=["load_model"]).load_model(stories_dir)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert text == tok.decode(hf_greedy(model, ids, 16)[0, ids.shape[1]:], skip_special_tokens=True)

    d = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512)).save_pretrained(d)
    AutoTokenizer.from_pretrained(stories_dir).save_pretrained(d)
    calls.clear()
    out = api.generate(str(d), "Once upon a time", max_new_tokens=4, note=notes.append)
    assert not calls and isinstance(out, str)
    assert len(notes) == 1 and "transformers generate" in notes[0] and "gpt2" in notes[0]


def test_load_auto_backend_is_reference_on_cpu(stories, tmp_path):
    from slq.runtime.checkpoint import load, save_checkpoint
    from slq.runtime.qlinear import QuantLinear
    from slq.quant.pipeline import quantize_model
    from slq.quant.spec import QuantSpec

    model, tok = stories
    res = quantize_model(model, QuantSpec(3, 32), method="rtn", progress=False)
    out = save_checkpoint(tmp_path / "ck", model, tok, res.qweights, {"plan": res.plan.to_dict()})
    q = load(out, backend="auto")
    qls = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert qls and {m.backend for m in qls} == {"reference"}
    assert q.slq_backends["rule"].startswith("cpu")
    with pytest.raises(SlqError, match="unknown backend 'fast'"):
        load(out, backend="fast")


def _first_divergence_is_a_near_tie(model, ids, out, ref, tol):
    """Per row: tokens equal, or the row's first differing step is one where the HF logits' top-2 gap
    is below tol (fp16 rounding differs between SDPA kernels, so a near-tie may break either way)."""
    if torch.equal(out, ref):
        return True
    n = min(out.shape[1], ref.shape[1])
    for b in range(ref.shape[0]):
        diff = (out[b, :n] != ref[b, :n]).nonzero()
        if len(diff) == 0:
            continue
        i = int(diff[0, 0])
        with torch.no_grad():
            logits = model(ref[b:b + 1, :i]).logits[0, -1].float()
        top = logits.topk(2).values
        if not (top[0] - top[1]) < tol:
            return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_fp16_cuda_graph_engine_equals_hf_generate(stories_dir, batch):
    from slq.models.sources import load_model

    model, tok = load_model(stories_dir, device="cuda")
    model.half()
    ids = equal_length_ids(tok, PROMPTS[:batch]).cuda()
    ref = hf_greedy(model, ids, 32)
    eng = DecodeEngine(model)
    assert eng.cuda_graph and eng.kv_block == 256
    out = eng.generate(ids, 32, eos_token_id=model.generation_config.eos_token_id)
    assert eng.stats.graphs == [256]
    assert _first_divergence_is_a_near_tie(model, ids, out, ref, tol=2e-2)
    out2 = eng.generate(ids, 32, eos_token_id=model.generation_config.eos_token_id)  # graph replayed, not recaptured
    assert torch.equal(out2, out) and eng.stats.graphs == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_compiled_step_in_a_cuda_graph_equals_the_eager_step(stories_dir, batch):
    """The inductor-compiled step captured in the engine's CUDA graph: logits within fp16 tolerance
    of the eager step's, tokens equal HF's (or first differ at a near-tie), and fewer graph nodes."""
    from slq.models.sources import load_model
    from slq.runtime.graphs import node_counts

    model, tok = load_model(stories_dir, device="cuda")
    model.half()
    ids = equal_length_ids(tok, PROMPTS[:batch]).cuda()
    ref = hf_greedy(model, ids, 32, eos_token_id=None, pad_token_id=0)
    eager = DecodeEngine(model, fuse=True)
    a = eager.generate(ids, 32, eos_token_id=None)
    comp = DecodeEngine(model, fuse=True, compile=True)
    assert comp.cuda_graph and comp.compile == "inductor"
    b = comp.generate(ids, 32, eos_token_id=None)
    torch.testing.assert_close(comp.logits, eager.logits, rtol=2e-2, atol=2e-2)
    assert _first_divergence_is_a_near_tie(model, ids, b, ref, tol=2e-2)
    assert _first_divergence_is_a_near_tie(model, ids, a, ref, tol=2e-2)
    n_eager, n_comp = node_counts(eager._graphs[256]), node_counts(comp._graphs[256])
    print("graph nodes per step: eager", n_eager, "compiled", n_comp)
    assert n_comp["kernel"] < n_eager["kernel"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gpu_quantized_engine_equals_hf_generate(stories, tmp_path, backend):
    from slq.runtime.checkpoint import load, save_checkpoint
    from slq.runtime.backends import triton_gemv
    from slq.quant.pipeline import quantize_model
    from slq.quant.spec import QuantSpec

    if backend == "triton" and not triton_gemv.available():
        pytest.skip("triton not installed")
    model, tok = stories
    res = quantize_model(model, QuantSpec(4, 32), method="rtn", progress=False)
    q = load(save_checkpoint(tmp_path / "ck", model, tok, res.qweights, {"plan": res.plan.to_dict()}),
             device="cuda", backend="reference")
    q.half()
    if backend != "reference":
        # stories' K = 172 layers are per-channel; triton needs 32 | K, so only layers it can take move
        from slq.runtime.qlinear import QuantLinear

        for m in q.modules():
            if isinstance(m, QuantLinear) and m.in_features % 32 == 0:
                m.set_backend(backend)
    ids = equal_length_ids(tok, PROMPTS[:2]).cuda()
    ref = hf_greedy(q, ids, 32)
    out = DecodeEngine(q).generate(ids, 32, eos_token_id=q.generation_config.eos_token_id)
    assert _first_divergence_is_a_near_tie(q, ids, out, ref, tol=2e-2)


_TRITON_SCRIPT = r"""
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, LlamaConfig
from slq.runtime.decode import DecodeEngine
from slq.runtime.qlinear import QuantLinear
from slq.quant.pipeline import quantize_model
from slq.quant.spec import QuantSpec

cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, initializer_range=0.2)
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(cfg).eval()
res = quantize_model(m, QuantSpec(4, 32), method="rtn", progress=False)
for name, q in res.qweights.items():
    parent, _, child = name.rpartition(".")
    setattr(m.get_submodule(parent), child, QuantLinear(q))
m.half()
ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    ref = m.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)  # reference backend
for mod in m.modules():
    if isinstance(mod, QuantLinear):
        mod.set_backend("triton")
import sys
eng = DecodeEngine(m, fuse=True, kv_block=8, compile=sys.argv[1] if len(sys.argv) > 1 else False)
out = eng.generate(ids, 4)
assert eng.layers[0].qkv.fused.backend == "triton" and eng.layers[0].gate_up.fused.backend == "triton"
with torch.no_grad():
    m.apply(lambda x: x.set_backend("reference") if isinstance(x, QuantLinear) else None)
    full = m(out.clone()).logits[:, -2].float()
err = (eng.logits - full).abs().max().item()
print("tokens_equal", bool(torch.equal(out, ref)), "max_logit_err", err)
assert torch.equal(out, ref) and err < 2e-2, (out, ref, err)
"""


@pytest.mark.parametrize("compile", ["", "aot_eager"], ids=["eager-step", "compiled-step"])
def test_triton_backend_through_the_engine_under_the_interpreter(compile):
    """The QuantLinear triton backend (fused q/k/v and gate/up repacked by the engine) inside the
    windowed decode step, eager or compiled whole (fullgraph: ``slq::quant_matmul`` is one node), on CPU
    through Triton's interpreter, against HF generate on the reference backend."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton", reason="triton is not installed; the CPU check needs its interpreter")
    src = Path(__file__).resolve().parents[2] / "src"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, *([compile] if compile else [])], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "tokens_equal True" in p.stdout
