"""The stacked per-layer solve on stories260K's layer 0: stacking changes nothing, errors match activations."""

import pytest
import torch

from slq.quant.calib import capture_layer0_inputs, collect_hessians, decoder_layers, eager_attention, layer_linears
from slq.quant.config import QuantConfig
from slq.quant.gptq import RowBlockHessians, factor, gptq_quantize_many
from slq.quant.grid import quantize_rtn
from slq.quant.solve import layer_weights, solve_layer
from slq.quant.spec import QuantSpec, resolve_group_size


def _layer0(model, windows, attention):
    layer = decoder_layers(model)[0]
    lins = layer_linears(layer)
    with eager_attention(model, attention):
        batches = capture_layer0_inputs(model, windows, 8, "cpu")
        hessians = collect_hessians(layer, batches, list(lins), attention=attention)
    return layer, batches, lins, hessians


def _specs(W, bits):
    return {n: tuple(QuantSpec(b, resolve_group_size(w.shape[1], 32)[0], False) for b in bits) for n, w in W.items()}


@pytest.mark.parametrize("attention", [False, True])
def test_stacked_solve_equals_each_piece_alone(stories, tiny_windows, attention):
    """Each linear (each key/value head's rows with attention-aware Hessians) solved on its own, with the factor
    of its own Hessian, gives the codes of the stacked solve: stacking linears that share an input is free."""
    model, _ = stories
    _, _, lins, hessians = _layer0(model, tiny_windows[:8], attention)
    W = layer_weights(lins)
    specs = _specs(W, (2, 4, 8))
    solved = solve_layer(W, specs, QuantConfig(group_size=32), hessians)
    assert any(isinstance(h, RowBlockHessians) for h in hessians.values()) == attention
    for name, w in W.items():
        h = hessians[name]
        blocks = ([(g * h.rows, (g + 1) * h.rows, acc) for g, acc in enumerate(h.blocks)]
                  if isinstance(h, RowBlockHessians) else [(0, w.shape[0], h)])
        assert [(b.start, b.end) for b in solved[name].blocks] == [(r0, r1) for r0, r1, _ in blocks]
        for k, spec in enumerate(specs[name]):
            alone = torch.cat([gptq_quantize_many(w[r0:r1], factor(acc.H), [spec], act_order=True)[0].codes
                               for r0, r1, acc in blocks])
            got = solved[name].qweights[k]
            assert got.spec == spec and got.codes.shape == w.shape
            agree = (got.codes == alone).float().mean().item()
            assert agree > 0.999, (name, spec.bits, agree)


def test_output_error_is_the_layer_output_error_on_the_activations(stories, tiny_windows):
    """With plain Hessians, H = 2/n X^T X: the solution's output error equals 2/n ||X (W - W_hat)^T||^2 computed
    from the captured inputs."""
    model, _ = stories
    layer, batches, lins, hessians = _layer0(model, tiny_windows[:8], False)
    xs, hooks = {}, []
    for n, lin in lins.items():
        hooks.append(lin.register_forward_pre_hook(
            lambda m, a, n=n: xs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).double())))
    with torch.no_grad():
        for b in batches:
            layer(b.hidden, **b.kwargs)
    for h in hooks:
        h.remove()
    W = layer_weights(lins)
    solved = solve_layer(W, _specs(W, (3,)), QuantConfig(group_size=32, attention=False), hessians)
    for name, w in W.items():
        X = torch.cat(xs[name])
        W_hat = solved[name].qweights[0].dequantize()
        want = float((X @ (w.double() - W_hat.double()).T).pow(2).sum() * 2 / X.shape[0])
        assert solved[name].output_error(w, W_hat) == pytest.approx(want, rel=1e-6), name


def test_rtn_without_hessians_is_rtn_of_each_linear(stories):
    model, _ = stories
    W = layer_weights(layer_linears(decoder_layers(model)[1]))
    specs = _specs(W, (4, 6))
    solved = solve_layer(W, specs, QuantConfig(group_size=32, method="rtn"))
    for name, w in W.items():
        assert solved[name].blocks == ()
        for k, spec in enumerate(specs[name]):
            want = quantize_rtn(w, spec)
            got = solved[name].qweights[k]
            assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)
    with pytest.raises(Exception, match="GPTQ needs"):
        solve_layer(W, specs, QuantConfig(group_size=32))
