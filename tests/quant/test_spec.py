import pytest

from slq.util.errors import SlqError
from slq.quant.spec import LayerPlan, Plan, QuantSpec, model_bits_per_param, resolve_group_size


@pytest.mark.parametrize(
    "K, requested, expected",
    [(576, 128, 64), (576, 64, 64), (576, 256, 64), (172, 128, None), (4096, 128, 128), (64, 128, 64),
     (1536, 256, 256), (96, 64, 32), (48, 32, 16), (40, 16, None), (576, None, None)],
)
def test_resolve_group_size_largest_power_of_two_divisor(K, requested, expected):
    g, note = resolve_group_size(K, requested)
    assert g == expected
    if g is not None:
        assert K % g == 0 and g >= 16 and g & (g - 1) == 0
        assert requested is None or g <= requested
    assert note


def test_bits_per_param_counts_scale_and_zero():
    assert QuantSpec(8, 64).bits_per_param(576) == pytest.approx(8 + 24 / 64)  # 8.375
    assert QuantSpec(4, 128, symmetric=True).bits_per_param(4096) == pytest.approx(4 + 16 / 128)
    assert QuantSpec(3, None).bits_per_param(172) == pytest.approx(3 + 19 / 172)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.5])
def test_bits_outside_range_rejected(bits):
    with pytest.raises(SlqError):
        QuantSpec(bits)


@pytest.mark.parametrize("g", [0, 8, 100, 48])
def test_bad_group_rejected(g):
    with pytest.raises(SlqError):
        QuantSpec(4, g)


def test_plan_roundtrip_and_weighted_average():
    p = Plan()
    p.add(LayerPlan("a", 10, 64, QuantSpec(2, 64), 64))
    p.add(LayerPlan("b", 30, 64, QuantSpec(8, 64, True), 64))
    expect = (10 * 64 * (2 + 18 / 64) + 30 * 64 * (8 + 16 / 64)) / (40 * 64)
    assert p.bits_per_param() == pytest.approx(expect)
    assert Plan.from_dict(p.to_dict()).to_dict() == p.to_dict()
    whole = model_bits_per_param(p, {"emb": (1000, 32)})
    assert whole == pytest.approx((p.total_bits + 32000) / (40 * 64 + 1000))
