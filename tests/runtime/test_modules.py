import pytest
import torch

from slq.util.errors import SlqError
from slq.quant.grid import quantize_rtn
from slq.runtime.qlinear import QuantLinear
from slq.quant.spec import QuantSpec


def test_reference_backend_is_dequantize_then_linear():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen)
    q = quantize_rtn(w, QuantSpec(3, 32))
    layer = QuantLinear(q, bias=torch.ones(16))
    x = torch.randn(5, 64, generator=gen)
    assert torch.equal(layer(x), x @ q.dequantize().T + 1)


def test_unknown_or_unavailable_backend_is_a_clear_error():
    layer = QuantLinear(quantize_rtn(torch.randn(8, 32), QuantSpec(4, 32)))
    with pytest.raises(SlqError, match="unknown backend"):
        layer.set_backend("nope")
    if not torch.cuda.is_available():
        with pytest.raises(SlqError, match="needs Triton and a CUDA GPU"):
            layer.set_backend("triton")
    assert layer.backend == "reference"
