"""Triton kernels for group-wise asymmetric INT weights, 2..8 bits, decode and small batch.

The oracle (``slq.grid.dequantize``): ``w[n, k] = (codes[n, k] - zero[n, k // G]) * scale[n, k // G]``.

Layout built once at load by :func:`repack` (the checkpoint stays kernel-agnostic)
--------------------------------------------------------------------------------
* **Bit planes.** A ``bits``-bit code is split into power-of-two planes, widest first:
  2 = 2, 3 = 2+1, 4 = 4, 5 = 4+1, 6 = 4+2, 7 = 4+2+1, 8 = 8 (plane ``p`` holds bits
  ``[shift_p, shift_p + pb)`` of the code). Storage is exactly ``bits`` bits per weight.
* **Blocks of 32 inputs, one word per plane bit.** K is cut into blocks of 32 consecutive inputs.
  A row's block takes ``pb`` int32 words per plane ("slots", ``bits`` slots in all). Input
  ``j = 4*u + i`` of the block (quad ``u``, byte ``i``) sits in slot ``a = u // (8/pb)``, field
  ``f = u % (8/pb)``, at bits ``[8*i + pb*f, 8*i + pb*f + pb)``. So
  ``(word >> (pb*f)) & 0x01010101 * (2^pb - 1)`` drops the plane bits of four inputs into the
  four *bytes* of a register, and the planes of a code combine with a shift and a LOP3 per four
  weights (SIMD within a register).
* **Rows contiguous.** ``qweight`` is int32 ``[K/32, bits, N]``: for one (block, slot) the words of
  consecutive rows are adjacent, so a thread loads 4 rows with one 16-byte load, a warp 512
  contiguous bytes, and the row vectors of scales / zeros (``[K/G, N]``, fp16 / uint8 as they come:
  24 bits per group, the roofline's count) land in the very same register layout: no shuffles,
  no shared memory, no barriers in the GEMV.

Decoding without integer->float conversions
-------------------------------------------
A byte ``q < 128`` moved into bits 16..23 of ``0x3F000000`` is the fp32 number
``0.5 + q/256`` (for 8-bit codes into bits 8..15: ``0.5 + q/65536``). One PRMT (byte permute,
inline PTX on the GPU; shifts and masks under the interpreter) makes it, one FFMA multiplies it
with the activation: ``t = sum x*(0.5 + q/256)``, so ``sum (q - z) x = 256 t - (128 + z) sum x``,
applied once per scale group and row. The tiled kernel feeds ``tl.dot`` the exact integers
``q - z`` (|q - z| <= 255: exact in fp16 and bf16) and scales the fp32 product per group.
Accumulation is fp32 throughout; the only rounding beyond fp32 is the final cast to the
activation dtype, so results are closer to exact than the oracle's own fp16 weights.

Kernels
-------
* ``_gemv_kernel`` (M <= 4; grid (M, row tiles, K splits)): CUDA-core dot products, each thread
  4 rows x 32 inputs per block, the next block's words prefetched while this one computes.
* ``_tiled_kernel`` (M > 4): the same words shifted into [16 inputs, rows] tiles of exact ``q - z``
  (integer ops, one select per extra slot), ``tl.dot`` on tensor cores, fp32 scale per group.
Both split K over programs when the output alone would not fill the GPU; the last program to
finish a tile (an atomic counter, reset by that program, so CUDA-graph replays stay valid) sums
the fp32 partials in a fixed order: results are deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

try:  # Triton is optional: importing slq must work without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = ["PLANES", "TritonWeight", "available", "op_args", "quant_matmul", "repack"]

# bits -> ((plane bits, shift in the code), ...), widest plane first
PLANES: dict[int, tuple[tuple[int, int], ...]] = {
    2: ((2, 0),),
    3: ((2, 0), (1, 2)),
    4: ((4, 0),),
    5: ((4, 0), (1, 4)),
    6: ((4, 0), (2, 4)),
    7: ((4, 0), (2, 4), (1, 6)),
    8: ((8, 0),),
}
GEMV_MAX_M = 4  # above this the tiled (tensor-core) kernel runs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when this backend can run here: Triton importable and a CUDA GPU (or the interpreter)."""
    if triton is None:
        return False
    return _interpreting() or torch.cuda.is_available()


# ----------------------------------------------------------------------------- layout (torch)


@dataclasses.dataclass(frozen=True, eq=False)
class TritonWeight:
    """A linear layer's weight in the kernel layout (see the module docstring)."""

    qweight: torch.Tensor  # int32 [K/32, bits, N]
    scale: torch.Tensor  # fp16 [K/G, N]
    zero: torch.Tensor  # uint8 [K/G, N]
    counters: torch.Tensor  # int32, split-K arrival counters; all zero between calls
    bits: int
    group_size: int  # G; K for per-channel
    n: int
    k: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self)


def repack(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int | None,
) -> TritonWeight:
    """Load-time repack of (codes uint8 [N, K], scale fp16 [N, K/G], zero uint8 [N, K/G]).

    ``group_size`` None (or >= K) means per-channel. Runs on the tensors' device."""
    if bits not in PLANES:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    n, k = codes.shape
    g = k if group_size is None or group_size >= k else int(group_size)
    if k % 32 or k % g or g < 16 or (g != k and (g & (g - 1) or g % 16)):
        raise ValueError(
            f"unsupported shape/group: K={k}, G={group_size} (need 32 | K and G a power of two >= 16 dividing K, or per-channel)"
        )
    ng = k // g
    if scale.shape != (n, ng) or zero.shape != (n, ng):
        raise ValueError(f"scale/zero must be [{n}, {ng}], got {tuple(scale.shape)} / {tuple(zero.shape)}")
    dev = codes.device
    nb = k // 32
    q = codes.to(torch.int32).view(n, nb, 32)
    slots = []
    for pb, sp in PLANES[bits]:
        plane = ((q >> sp) & ((1 << pb) - 1)).to(torch.int64)  # [N, nb, 32]
        f_per = 8 // pb
        plane = plane.view(n, nb, pb, f_per, 4)  # j = 4u + i, u = a*f_per + f
        shifts = (8 * torch.arange(4, device=dev)).view(1, 1, 1, 1, 4) + (pb * torch.arange(f_per, device=dev)).view(1, 1, 1, f_per, 1)
        slots.append((plane << shifts).sum(dim=(3, 4)))  # disjoint bits: sum == or; [N, nb, pb]
        del plane
    w = torch.cat(slots, dim=2)  # [N, nb, bits]
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).permute(1, 2, 0).contiguous()  # [nb, bits, N]
    counters = torch.zeros(4 * (-(-n // 16)) + 64, dtype=torch.int32, device=dev)
    return TritonWeight(
        qweight=w,
        scale=scale.to(torch.float16).t().contiguous(),
        zero=zero.to(torch.uint8).t().contiguous(),
        counters=counters,
        bits=bits,
        group_size=g,
        n=n,
        k=k,
    )


# ----------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _prmt(q, magic, SEL: tl.constexpr):
        """PRMT with `magic` (0x3F000000, passed at run time so that ptxas keeps it in one register
        and the selector becomes the immediate: no MOV per PRMT) as the second source."""
        A: tl.constexpr = "prmt.b32 $0, $1, $2, "
        m = tl.full(q.shape, 0, tl.int32) + magic
        if SEL == 0x7044:
            r = tl.inline_asm_elementwise(A + "0x7044;", "=r,r,r", [q, m], dtype=tl.int32, is_pure=True, pack=1)
        elif SEL == 0x7144:
            r = tl.inline_asm_elementwise(A + "0x7144;", "=r,r,r", [q, m], dtype=tl.int32, is_pure=True, pack=1)
        elif SEL == 0x7244:
            r = tl.inline_asm_elementwise(A + "0x7244;", "=r,r,r", [q, m], dtype=tl.int32, is_pure=True, pack=1)
        elif SEL == 0x7344:
            r = tl.inline_asm_elementwise(A + "0x7344;", "=r,r,r", [q, m], dtype=tl.int32, is_pure=True, pack=1)
        elif SEL == 0x7404:
            r = tl.inline_asm_elementwise(A + "0x7404;", "=r,r,r", [q, m], dtype=tl.int32, is_pure=True, pack=1)
        elif SEL == 0x7414:
            r = tl.inline_asm_elementwise(A + "0x7414;", "=r,r,r", [q, m], dtype=tl.int32, is_pure=True, pack=1)
        elif SEL == 0x7424:
            r = tl.inline_asm_elementwise(A + "0x7424;", "=r,r,r", [q, m], dtype=tl.int32, is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise(A + "0x7434;", "=r,r,r", [q, m], dtype=tl.int32, is_pure=True, pack=1)
        return r

    @triton.jit
    def _byte_f32(q, magic, I: tl.constexpr, POS: tl.constexpr, USE_ASM: tl.constexpr):
        """Byte I of q as the fp32 0.5 + byte * 2^(8*POS - 24) (byte < 128 when POS == 2)."""
        if USE_ASM:
            SEL: tl.constexpr = (0x7044 | (I << 8)) if POS == 2 else (0x7404 | (I << 4))
            r = _prmt(q, magic, SEL)
        else:
            SH: tl.constexpr = 8 * (I - POS)
            if SH > 0:
                r = (q >> SH) & (0xFF << (8 * POS))
            elif SH < 0:
                r = (q << (-SH)) & (0xFF << (8 * POS))
            else:
                r = q & (0xFF << (8 * POS))
            r = r | 0x3F000000
        return r.to(tl.float32, bitcast=True)

    @triton.jit
    def _field(w, PB: tl.constexpr, F: tl.constexpr, SP: tl.constexpr):
        """Plane bits of one quad (field F of a PB-bit word) moved to code bit SP of each byte."""
        M: tl.constexpr = (((1 << PB) - 1) * 0x01010101) if PB < 8 else 0
        SH: tl.constexpr = PB * F - SP
        if PB == 8:
            r = w
        elif SH > 0:
            r = (w >> SH) & (M << SP)
        elif SH < 0:
            r = (w << (-SH)) & (M << SP)
        else:
            r = w & (M << SP)
        return r

    @triton.jit
    def _ld(ptrs, mask, EVEN_N: tl.constexpr):
        if EVEN_N:
            r = tl.load(ptrs)
        else:
            r = tl.load(ptrs, mask=mask, other=0)
        return r

    @triton.jit
    def _slots(ptrs, N, mask, BITS: tl.constexpr, EVEN_N: tl.constexpr):
        """The BITS slot words of one block for a vector of rows (unused outputs repeat slot 0)."""
        w0 = _ld(ptrs, mask, EVEN_N)
        w1 = w0
        w2 = w0
        w3 = w0
        w4 = w0
        w5 = w0
        w6 = w0
        w7 = w0
        if BITS > 1:
            w1 = _ld(ptrs + N, mask, EVEN_N)
        if BITS > 2:
            w2 = _ld(ptrs + 2 * N, mask, EVEN_N)
        if BITS > 3:
            w3 = _ld(ptrs + 3 * N, mask, EVEN_N)
        if BITS > 4:
            w4 = _ld(ptrs + 4 * N, mask, EVEN_N)
        if BITS > 5:
            w5 = _ld(ptrs + 5 * N, mask, EVEN_N)
        if BITS > 6:
            w6 = _ld(ptrs + 6 * N, mask, EVEN_N)
        if BITS > 7:
            w7 = _ld(ptrs + 7 * N, mask, EVEN_N)
        return w0, w1, w2, w3, w4, w5, w6, w7

    @triton.jit
    def _pick(w0, w1, w2, w3, w4, w5, w6, w7, IDX: tl.constexpr):
        if IDX == 0:
            r = w0
        elif IDX == 1:
            r = w1
        elif IDX == 2:
            r = w2
        elif IDX == 3:
            r = w3
        elif IDX == 4:
            r = w4
        elif IDX == 5:
            r = w5
        elif IDX == 6:
            r = w6
        else:
            r = w7
        return r

    @triton.jit
    def _quad(w0, w1, w2, w3, w4, w5, w6, w7, U: tl.constexpr,
              PB0: tl.constexpr, PB1: tl.constexpr, PB2: tl.constexpr):
        """Codes of inputs 4U..4U+3 of a block, one per byte."""
        F0: tl.constexpr = 8 // PB0
        qd = _field(_pick(w0, w1, w2, w3, w4, w5, w6, w7, U // F0), PB0, U % F0, 0)
        if PB1 > 0:
            F1: tl.constexpr = 8 // PB1
            qd = qd | _field(_pick(w0, w1, w2, w3, w4, w5, w6, w7, PB0 + U // F1), PB1, U % F1, PB0)
        if PB2 > 0:
            F2: tl.constexpr = 8 // PB2
            qd = qd | _field(_pick(w0, w1, w2, w3, w4, w5, w6, w7, PB0 + PB1 + U // F2), PB2, U % F2, PB0 + PB1)
        return qd

    @triton.jit
    def _fixup(part, ws_ptr, cnt_ptr, out_ptr, offs, mask, tile, pid_s, SPLIT, TILE_ELEMS, UNROLL: tl.constexpr):
        """Split-K: store the fp32 partial; the last program of a tile sums all, in order."""
        tl.store(ws_ptr + pid_s * TILE_ELEMS + offs, part, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros(part.shape, dtype=tl.float32)
            for s0 in range(0, SPLIT, UNROLL):  # UNROLL independent loads in flight, summed in a fixed order
                for s in tl.static_range(UNROLL):
                    ok = mask & ((offs * 0 + (s0 + s)) < SPLIT)
                    total += tl.load(ws_ptr + (s0 + s) * TILE_ELEMS + offs, mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr,
        M, N, K, NB, GB, BLOCKS_PER_SPLIT, SPLIT, MAGIC,
        BITS: tl.constexpr, BN: tl.constexpr, HAS_SPLIT: tl.constexpr, USE_ASM: tl.constexpr,
        EVEN_N: tl.constexpr, G16: tl.constexpr, PREFETCH: tl.constexpr,
        PB0: tl.constexpr, PB1: tl.constexpr, PB2: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        POS: tl.constexpr = 1 if BITS == 8 else 2
        MULT: tl.constexpr = 65536.0 if BITS == 8 else 256.0
        OFF: tl.constexpr = MULT * 0.5
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < N
        w_rows = w_ptr + rows
        x_row = x_ptr + pid_m * K
        acc = tl.zeros([BN], dtype=tl.float32)
        t = tl.zeros([BN], dtype=tl.float32)
        xs = tl.sum(t, axis=0)  # a 0-d fp32 zero: the running sum of x over the group
        kb0 = pid_s * BLOCKS_PER_SPLIT
        kb1 = tl.minimum(kb0 + BLOCKS_PER_SPLIT, NB)
        if PREFETCH:
            c0, c1, c2, c3, c4, c5, c6, c7 = _slots(w_rows + kb0 * (BITS * N), N, rmask, BITS, EVEN_N)
        for kb in range(kb0, kb1):
            if PREFETCH:  # next block's words in flight while this one computes
                nxt = tl.minimum(kb + 1, NB - 1)
                n0, n1, n2, n3, n4, n5, n6, n7 = _slots(w_rows + nxt * (BITS * N), N, rmask, BITS, EVEN_N)
            else:
                c0, c1, c2, c3, c4, c5, c6, c7 = _slots(w_rows + kb * (BITS * N), N, rmask, BITS, EVEN_N)
            xb = x_row + kb * 32
            for u in tl.static_range(8):
                qd = _quad(c0, c1, c2, c3, c4, c5, c6, c7, u, PB0, PB1, PB2)
                for i in tl.static_range(4):
                    xj = tl.load(xb + (4 * u + i)).to(tl.float32)
                    t += _byte_f32(qd, MAGIC, i, POS, USE_ASM) * xj
                    xs += xj
                if G16:  # G == 16: two groups per block
                    if u % 4 == 3:
                        g = 2 * kb + u // 4
                        sc = _ld(s_ptr + g * N + rows, rmask, EVEN_N).to(tl.float32)
                        zp = _ld(z_ptr + g * N + rows, rmask, EVEN_N).to(tl.float32)
                        acc += t * (sc * MULT) - (sc * (zp + OFF)) * xs
                        t = tl.zeros([BN], dtype=tl.float32)
                        xs = xs * 0.0
            if not G16:  # a group spans GB blocks: fold at its end (or at the end of this split)
                if ((kb + 1) % GB == 0) | (kb == kb1 - 1):
                    g = kb // GB
                    sc = _ld(s_ptr + g * N + rows, rmask, EVEN_N).to(tl.float32)
                    zp = _ld(z_ptr + g * N + rows, rmask, EVEN_N).to(tl.float32)
                    acc += t * (sc * MULT) - (sc * (zp + OFF)) * xs
                    t = tl.zeros([BN], dtype=tl.float32)
                    xs = xs * 0.0
            if PREFETCH:
                c0, c1, c2, c3, c4, c5, c6, c7 = n0, n1, n2, n3, n4, n5, n6, n7
        offs = pid_m * N + rows
        if not HAS_SPLIT:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=rmask)
        else:
            _fixup(acc, ws_ptr, cnt_ptr, out_ptr, offs, rmask, pid_n * M + pid_m, pid_s, SPLIT, M * N, 8)

    @triton.jit
    def _plane_tile(w0, w1, w2, w3, w4, w5, w6, w7, H: tl.constexpr, PB: tl.constexpr, O: tl.constexpr,
                    SP: tl.constexpr):
        """Bits [SP, SP+PB) of the codes of inputs 16H..16H+15 of a block, as a [16, BN] tile."""
        F: tl.constexpr = 8 // PB
        jj = tl.arange(0, 16)
        u = 4 * H + jj // 4
        a = u // F
        sh = 8 * (jj % 4) + PB * (u % F)
        A0: tl.constexpr = (4 * H) // F
        A1: tl.constexpr = (4 * H + 3) // F
        word = _pick(w0, w1, w2, w3, w4, w5, w6, w7, O + A0)[None, :] + 0 * sh[:, None]
        for A in tl.static_range(A0 + 1, A1 + 1):
            word = tl.where((a == A)[:, None], _pick(w0, w1, w2, w3, w4, w5, w6, w7, O + A)[None, :], word)
        return ((word >> sh[:, None]) & ((1 << PB) - 1)) << SP

    @triton.jit
    def _tiled_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr,
        M, N, K, NB, GB, BLOCKS_PER_SPLIT, SPLIT, MAGIC,
        BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_SPLIT: tl.constexpr,
        USE_ASM: tl.constexpr, EVEN_N: tl.constexpr, G16: tl.constexpr,
        PB0: tl.constexpr, PB1: tl.constexpr, PB2: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        DT: tl.constexpr = x_ptr.dtype.element_ty
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < N
        w_rows = w_ptr + rows
        ms = pid_m * BM + tl.arange(0, BM)
        mmask = ms < M
        kk = tl.arange(0, 16)
        x_rows = x_ptr + ms[:, None] * K + kk[None, :]
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        kb0 = pid_s * BLOCKS_PER_SPLIT
        kb1 = tl.minimum(kb0 + BLOCKS_PER_SPLIT, NB)
        for kb in range(kb0, kb1):
            c0, c1, c2, c3, c4, c5, c6, c7 = _slots(w_rows + kb * (BITS * N), N, rmask, BITS, EVEN_N)
            for h in tl.static_range(2):
                if G16:
                    g = 2 * kb + h
                else:
                    g = kb // GB
                sc = _ld(s_ptr + g * N + rows, rmask, EVEN_N).to(tl.float32)
                zp = _ld(z_ptr + g * N + rows, rmask, EVEN_N).to(tl.int32)
                code = _plane_tile(c0, c1, c2, c3, c4, c5, c6, c7, h, PB0, 0, 0)
                if PB1 > 0:
                    code = code | _plane_tile(c0, c1, c2, c3, c4, c5, c6, c7, h, PB1, PB0, PB0)
                if PB2 > 0:
                    code = code | _plane_tile(c0, c1, c2, c3, c4, c5, c6, c7, h, PB2, PB0 + PB1, PB0 + PB1)
                # exact integers q - z (|q - z| <= 255: exact in fp16 and bf16), [16 inputs, BN rows]
                wq = (code - zp[None, :]).to(tl.float32).to(DT)
                xt = tl.load(x_rows + (kb * 32 + 16 * h), mask=mmask[:, None], other=0.0)
                if USE_ASM:
                    part = tl.dot(xt, wq)
                else:  # the interpreter's bf16 dot is wrong (Triton 3.9): an exact fp32 one instead
                    part = tl.dot(xt.to(tl.float32), wq.to(tl.float32), input_precision="ieee")
                acc += part * sc[None, :]
        offs = ms[:, None] * N + rows[None, :]
        omask = mmask[:, None] & rmask[None, :]
        if not HAS_SPLIT:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            _fixup(acc, ws_ptr, cnt_ptr, out_ptr, offs, omask, pid_n * tl.num_programs(0) + pid_m, pid_s, SPLIT, M * N, 2)


# ----------------------------------------------------------------------------- launch


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    if index < 0:
        return 8
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split(tiles: int, nb: int, sms: int, waves: float) -> tuple[int, int]:
    """(split, blocks per split): about `waves` x SMs programs, no empty split."""
    want = max(1, min(nb, -(-int(waves * sms) // max(tiles, 1))))
    bps = -(-nb // want)
    return -(-nb // bps), bps


# GEMV launch defaults (num_warps, rows per program, waves of programs, prefetch)
# chosen from the H100 sweep in bench/results (docs/kernels.md): 4 warps x 4 rows/thread, ~4 waves
GEMV_CONFIG = dict(num_warps=4, bn=512, waves=4.0, prefetch=True)
TILED_CONFIG = dict(num_warps=4, bn=128, waves=4.0)


def _launch(x: torch.Tensor, w: TritonWeight, path: int = 0, **cfg) -> torch.Tensor:
    """Launch one kernel; cfg overrides GEMV_CONFIG / TILED_CONFIG (benchmark sweeps)."""
    m = x.shape[0]
    n, k = w.n, w.k
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    use_asm = (not _interpreting()) and x.is_cuda
    sms = _num_sms(x.device.index if x.is_cuda else -1)
    nb = k // 32
    planes = [pb for pb, _ in PLANES[w.bits]] + [0, 0]
    g16 = w.group_size == 16
    gb = max(1, w.group_size // 32)
    gemv = (m <= GEMV_MAX_M) if path == 0 else (path == 1)
    max_tiles = 4 * (-(-n // 16)) + 64  # what w.counters covers (M <= 64 tiles of >= 16 x 64)
    c = {**(GEMV_CONFIG if gemv else TILED_CONFIG), **{key: v for key, v in cfg.items() if v is not None}}
    if gemv and w.bits >= 6 and cfg.get("waves") is None:
        c["waves"] = 2.0  # wide codes: fewer, longer programs won the sweep
    bn = c["bn"]
    if gemv:
        tiles = -(-n // bn) * m
        grid_mn = (m, -(-n // bn))
    else:
        bm = 16 if m <= 16 else 32  # BM = 64 would pick wgmma, whose 16-deep tiles Triton rejects
        grid_mn = (-(-m // bm), -(-n // bn))
        tiles = grid_mn[0] * grid_mn[1]
    split, bps = _split(tiles, nb, sms, c["waves"]) if c.get("split") is None else (c["split"], -(-nb // c["split"]))
    if tiles > max_tiles:
        split, bps = 1, nb
    ws = torch.empty((split, m, n) if split > 1 else (1,), dtype=torch.float32, device=x.device)
    common = (x, w.qweight, w.scale, w.zero, out, ws, w.counters, m, n, k, nb, gb, bps, split, 0x3F000000)
    if gemv:
        _gemv_kernel[(*grid_mn, split)](
            *common, BITS=w.bits, BN=bn, HAS_SPLIT=split > 1, USE_ASM=use_asm, EVEN_N=n % bn == 0,
            G16=g16, PREFETCH=bool(c["prefetch"]), PB0=planes[0], PB1=planes[1], PB2=planes[2],
            num_warps=c["num_warps"],
        )
    else:
        _tiled_kernel[(*grid_mn, split)](
            *common, BITS=w.bits, BM=bm, BN=bn, HAS_SPLIT=split > 1, USE_ASM=use_asm, EVEN_N=n % bn == 0,
            G16=g16, PB0=planes[0], PB1=planes[1], PB2=planes[2], num_warps=c["num_warps"],
        )
    return out


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("slq::quant_matmul", mutates_args=())
def _quant_matmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    counters: torch.Tensor,
    bits: int,
    group_size: int,
    n: int,
    k: int,
    path: int,
) -> torch.Tensor:
    w = TritonWeight(qweight, scale, zero, counters, bits, group_size, n, k)
    return _launch(x.contiguous(), w, path)


@_quant_matmul_op.register_fake
def _(x, qweight, scale, zero, counters, bits, group_size, n, k, path):
    return x.new_empty((x.shape[0], n))


def op_args(x: torch.Tensor, w: TritonWeight, path: int = 0) -> tuple:
    """Arguments of ``torch.ops.slq.quant_matmul`` for x [M, K] (for opcheck and tracing)."""
    return (x, w.qweight, w.scale, w.zero, w.counters, w.bits, w.group_size, w.n, w.k, path)


def quant_matmul(x: torch.Tensor, w: TritonWeight, path: int = 0) -> torch.Tensor:
    """y = x @ dequant(w).T for x [..., K] fp16/bf16; y [..., N] in x's dtype.

    ``path``: 0 picks by M (GEMV for M <= 4, tiled otherwise), 1 forces GEMV, 2 tiled.
    """
    if x.shape[-1] != w.k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.k}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"activations must be fp16 or bf16, got {x.dtype}")
    lead = x.shape[:-1]
    y = torch.ops.slq.quant_matmul(*op_args(x.reshape(-1, w.k), w, path))
    return y.reshape(*lead, w.n)
