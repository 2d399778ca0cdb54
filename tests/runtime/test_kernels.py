"""Kernels against the torch oracle.

CPU: the Triton kernels run under the interpreter (TRITON_INTERPRET=1) in a subprocess, since the
variable must be set before triton decorates the kernels, which a test process cannot promise.
GPU (``-m gpu``): every bitwidth, group size, M and dtype, the model shapes, a CUDA graph,
``torch.library.opcheck``, and the Humming adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[2] / "src"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, G: int) -> torch.Tensor:
    """The oracle: w[n, k] = fp16((codes[n, k] - zero[n, k // G]) * scale[n, k // G])."""
    g = torch.arange(codes.shape[1], device=codes.device) // G
    return ((codes.float() - zero.float()[:, g]) * scale.float()[:, g]).half()


def random_layer(n: int, k: int, bits: int, G: int | None, device="cpu", gen=None):
    g = k if G is None else G
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device=device, generator=gen)
    scale = (torch.rand(n, k // g, device=device, generator=gen) * 0.02 + 1e-3).half()
    zero = torch.randint(0, 2**bits, (n, k // g), dtype=torch.uint8, device=device, generator=gen)
    return codes, scale, zero, g


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


# --------------------------------------------------------------------------- CPU (interpreter)

# (bits, N, K, G or None, M, dtype): every bitwidth, both kernels, padded K (576), masked N (48),
# per-channel and G = 16 .. 256; kept small, the interpreter is slow.
CPU_CASES = [
    (2, 64, 256, 32, 1, "float16"),
    (2, 48, 576, 64, 16, "bfloat16"),
    (3, 64, 256, 128, 1, "bfloat16"),
    (3, 64, 512, 16, 8, "float16"),
    (4, 64, 256, 256, 1, "float16"),
    (4, 64, 256, None, 4, "bfloat16"),
    (4, 32, 576, None, 16, "float16"),
    (5, 64, 256, 64, 1, "bfloat16"),
    (5, 64, 256, 128, 5, "float16"),
    (6, 48, 576, 32, 1, "float16"),
    (6, 64, 256, 128, 16, "bfloat16"),
    (7, 64, 512, 128, 1, "float16"),
    (7, 64, 256, 32, 16, "float16"),
    (8, 64, 256, 128, 1, "bfloat16"),
    (8, 48, 576, None, 16, "bfloat16"),
]

_CPU_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import triton  # noqa: F401  (fails here, not in the parent, if it is missing)
    from slq.runtime.backends import triton_gemv as tg
    sys.path.insert(0, sys.argv[2])
    from test_kernels import dequant, random_layer, rel_err
    out = {}
    gen = torch.Generator().manual_seed(0)
    for bits, n, k, G, m, dt in json.loads(sys.argv[1]):
        dtype = getattr(torch, dt)
        codes, scale, zero, g = random_layer(n, k, bits, G, gen=gen)
        w = tg.repack(codes, scale, zero, bits, G)
        x = torch.randn(m, k, generator=gen).to(dtype)
        y = tg.quant_matmul(x, w)
        ref = x.float() @ dequant(codes, scale, zero, g).float().T
        out[str([bits, n, k, G, m, dt])] = dict(
            err=rel_err(y, ref), dtype=str(y.dtype), shape=list(y.shape),
            finite=bool(torch.isfinite(y).all()), counters_zero=bool((w.counters == 0).all()))
    # the custom op's registrations (schema, fake, autograd, AOT dispatch)
    codes, scale, zero, g = random_layer(64, 256, 3, 64, gen=gen)
    w = tg.repack(codes, scale, zero, 3, 64)
    x = torch.randn(2, 256, generator=gen).half()
    args = tg.op_args(x, w)
    res = torch.library.opcheck(torch.ops.slq.quant_matmul.default, args)
    out["opcheck"] = {key: str(val) for key, val in res.items()}
    # torch.compile through the fake implementation (no inductor codegen needed)
    f = torch.compile(lambda a: tg.quant_matmul(a, w) * 2, backend="aot_eager", fullgraph=True)
    ref = x.float() @ dequant(codes, scale, zero, g).float().T * 2
    out["compile_err"] = rel_err(f(x), ref)
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton", reason="triton is not installed (pip install triton); the CPU tests need its interpreter")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _CPU_SCRIPT, json.dumps(CPU_CASES), str(Path(__file__).parent)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT"):])


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "b{}-{}x{}-G{}-M{}-{}".format(*c))
def test_interpreter_matches_oracle(interpreter_results, case):
    r = interpreter_results[str(list(case))]
    dtype = getattr(torch, case[5])
    assert r["finite"] and r["dtype"] == str(dtype) and r["shape"] == [case[4], case[1]]
    assert r["err"] < TOL[dtype], r
    assert r["counters_zero"], "split-K counters must be reset for the next call / graph replay"


def test_interpreter_opcheck_and_compile(interpreter_results):
    assert all(v == "SUCCESS" for v in interpreter_results["opcheck"].values()), interpreter_results["opcheck"]
    assert interpreter_results["compile_err"] < TOL[torch.float16]


def test_repack_layout_roundtrip():
    """Unpacking the repacked words by the documented layout gives back every code."""
    from slq.runtime.backends import triton_gemv as tg

    gen = torch.Generator().manual_seed(1)
    for bits in range(2, 9):
        n, k = 8, 576
        codes, scale, zero, g = random_layer(n, k, bits, 64, gen=gen)
        w = tg.repack(codes, scale, zero, bits, 64)
        words = (w.qweight.to(torch.int64) & 0xFFFFFFFF).permute(2, 0, 1)  # [N, block, slot]
        got = torch.zeros(n, k // 32, 32, dtype=torch.int64)
        slot = 0
        for pb, sp in tg.PLANES[bits]:
            for j in range(32):
                u, i = divmod(j, 4)
                a, f = divmod(u, 8 // pb)
                field = (words[:, :, slot + a] >> (8 * i + pb * f)) & ((1 << pb) - 1)
                got[:, :, j] |= field << sp
            slot += pb
        got = got.reshape(n, k)  # k = block*32 + j
        assert torch.equal(got, codes.to(torch.int64)), bits
        assert w.scale.shape == (k // 64, n) and w.zero.dtype == torch.uint8


def test_import_without_triton_is_safe():
    code = "import sys; sys.modules['triton'] = None; import slq.runtime.backends.triton_gemv as t; print(t.available())"
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# --------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
# one xdist worker per bitwidth (pytest -n N --dist loadgroup): each compiles its kernels once
BITS = [pytest.param(b, marks=pytest.mark.xdist_group(f"bits{b}"), id=f"b{b}") for b in range(2, 9)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _poison(nbytes: int) -> None:
    """Fill the allocator's next block with NaN so an unwritten output element shows up."""
    t = torch.full((nbytes // 2 + 1024,), float("nan"), dtype=torch.float16, device="cuda")
    del t


def _check_triton(n, k, bits, G, ms, dtypes, gen):
    from slq.runtime.backends import triton_gemv as tg

    codes, scale, zero, g = random_layer(n, k, bits, G, device="cuda", gen=gen)
    w = tg.repack(codes, scale, zero, bits, G)
    wd = dequant(codes, scale, zero, g).float()
    for m in ms:
        for dtype in dtypes:
            x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
            _poison(m * n * 2)
            y = tg.quant_matmul(x, w)
            ref = x.float() @ wd.T
            err = rel_err(y, ref)
            assert y.dtype == dtype and bool(torch.isfinite(y).all()), (bits, n, k, G, m, dtype)
            assert err < TOL[dtype], (bits, n, k, G, m, dtype, err)
    torch.cuda.synchronize()
    assert bool((w.counters == 0).all())


@gpu
@needs_cuda
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("G", [32, 64, 128, 256, None])
def test_triton_every_bits_group_m(bits, G):
    gen = torch.Generator(device="cuda").manual_seed(100 * bits + (G or 0))
    _check_triton(1536, 2048, bits, G, [1, 4, 16, 64], [torch.float16, torch.bfloat16], gen)


@gpu
@needs_cuda
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "n,k,G",
    [(1536, 576, 64), (576, 1536, 128), (192, 576, None), (4096, 4096, 128), (14336, 4096, 128),
     (4096, 14336, 128), (6144, 4096, 128)],
)
def test_triton_model_shapes(bits, n, k, G):
    gen = torch.Generator(device="cuda").manual_seed(7 * bits + n + k)
    _check_triton(n, k, bits, G, [1, 16], [torch.float16, torch.bfloat16], gen)


@gpu
@needs_cuda
def test_triton_cuda_graph_replays_with_new_inputs():
    from slq.runtime.backends import triton_gemv as tg

    gen = torch.Generator(device="cuda").manual_seed(3)
    codes, scale, zero, g = random_layer(4096, 4096, 4, 128, device="cuda", gen=gen)
    w = tg.repack(codes, scale, zero, 4, 128)
    wd = dequant(codes, scale, zero, g).float()
    for m in (1, 16):
        x = torch.randn(m, 4096, device="cuda", generator=gen).half()
        tg.quant_matmul(x, w)  # compile outside the capture
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            tg.quant_matmul(x, w)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = tg.quant_matmul(x, w)
        for _ in range(3):
            x.copy_(torch.randn(m, 4096, device="cuda", generator=gen).half())
            y.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert rel_err(y, x.float() @ wd.T) < TOL[torch.float16]


@gpu
@needs_cuda
def test_triton_opcheck_on_gpu():
    from slq.runtime.backends import triton_gemv as tg

    gen = torch.Generator(device="cuda").manual_seed(4)
    codes, scale, zero, g = random_layer(1024, 2048, 5, 128, device="cuda", gen=gen)
    w = tg.repack(codes, scale, zero, 5, 128)
    for m in (1, 16):
        x = torch.randn(m, 2048, device="cuda", generator=gen).bfloat16()
        args = tg.op_args(x, w)
        torch.library.opcheck(torch.ops.slq.quant_matmul.default, args)


@gpu
@needs_cuda
@pytest.mark.parametrize("bits", BITS)
def test_humming_adapter_matches_oracle(bits):
    pytest.importorskip("humming", reason="humming-kernels is not installed")
    from slq.runtime.backends import humming as hm

    gen = torch.Generator(device="cuda").manual_seed(11 * bits)
    for n, k, G in [(1536, 2048, 128), (4096, 4096, 64), (1536, 2048, None)]:
        codes, scale, zero, g = random_layer(n, k, bits, G, device="cuda", gen=gen)
        wd = dequant(codes, scale, zero, g).float()
        for dtype in (torch.float16, torch.bfloat16):
            w = hm.repack(codes, scale, zero, bits, G, dtype=dtype)
            for m in (1, 16):
                x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
                _poison(m * n * 2)
                y = w(x)
                assert bool(torch.isfinite(y).all())
                assert rel_err(y, x.float() @ wd.T) < TOL[dtype], (bits, n, k, G, m, dtype)
