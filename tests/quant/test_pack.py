"""Packing through compressed-tensors is lossless for every shape, bitwidth and grid."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slq.runtime.checkpoint import pack_weight, unpack_weight
from slq.quant.grid import QuantizedWeight
from slq.quant.spec import QuantSpec


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    N=st.integers(1, 70),
    groups=st.integers(1, 5),
    G=st.sampled_from([16, 32, 64, None]),
    sym=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_is_identity(bits, N, groups, G, sym, seed):
    gen = torch.Generator().manual_seed(seed)
    K = groups * (G or 24)  # per-channel with K not a multiple of 32 exercises padding
    ng = 1 if G is None else groups
    codes = torch.randint(0, 2**bits, (N, K), generator=gen, dtype=torch.int64).to(torch.uint8)
    zero = (torch.full((N, ng), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (N, ng), generator=gen)).to(torch.uint8)
    scale = (torch.rand(N, ng, generator=gen) + 0.01).half()
    spec = QuantSpec(bits, G, sym)
    q = QuantizedWeight(codes, scale, zero, spec)
    t = pack_weight(q)
    assert t["weight_packed"].dtype == torch.int32
    assert t["weight_packed"].shape == (N, -(-K * bits // 32))
    assert ("weight_zero_point" in t) == (not sym)
    back = unpack_weight(t, spec, "m")
    assert torch.equal(back.codes, codes)
    assert torch.equal(back.zero, zero)
    assert torch.equal(back.scale, scale)
