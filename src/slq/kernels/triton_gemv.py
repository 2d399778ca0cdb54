"""Triton kernels for group-wise asymmetric INT weights, 2..8 bits, decode and small batch.

The oracle (``slq.grid.dequantize``): ``w[n, k] = (codes[n, k] - zero[n, k // G]) * scale[n, k // G]``.

Layout built once at load by :func:`repack` (the checkpoint stays kernel-agnostic)
--------------------------------------------------------------------------------
* **Bit planes.** A ``bits``-bit code is split into power-of-two planes, widest first:
  2 = 2, 3 = 2+1, 4 = 4, 5 = 4+1, 6 = 4+2, 7 = 4+2+1, 8 = 8 (plane ``p`` holds bits
  ``[shift_p, shift_p + pb)`` of the code). Storage is exactly ``bits`` bits per weight.
* **K blocks of 32*C values.** K is cut into blocks of ``32*C`` inputs (``C`` a power of two,
  4..32, chosen from G and K). Inside a block, input ``k = j*C + c`` (``j`` in 0..31,
  ``c`` in 0..C-1) goes to *unit* ``c``, *position* ``j``: for a fixed ``j`` the C units
  cover C consecutive inputs, so the activation slice a kernel needs is contiguous.
* **Words.** A unit's 32 positions take ``pb`` int32 words per plane ("slots"). Position
  ``j = 4*u + i`` (quad ``u``, byte ``i``) of slot ``a = u // (8/pb)``, field
  ``f = u % (8/pb)`` sits at bits ``[8*i + pb*f, 8*i + pb*f + pb)``. So
  ``(word >> (pb*f)) & 0x..0101 * (2^pb - 1)`` drops the plane bits of four positions into
  the four *bytes* of a register, and the planes of one code combine with one shift + one
  LOP3 per four weights (SIMD within a register).
* **Order in memory.** ``qweight`` int32 ``[N, bits*Kp/32]``; row ``n``, block ``kb``, slot
  ``s`` (all planes' slots in plane order), unit ``c`` at
  ``n*bits*Kp/32 + kb*bits*C + s*C + c``: a block of a row is one contiguous run, and the
  C units of one slot are contiguous (16-byte loads, coalesced across threads).
* **Scales / zeros** are kept as they come (fp16 scale, uint8 zero: 24 bits per group, the
  roofline's count), transposed to ``[K/G, N]`` so one group of a row-tile is one load.
* K is padded to a multiple of ``32*C`` when it must be (only K = 576 among the tested shapes):
  the padding's activations are masked to zero, so its codes never count.

Decoding without integer->float conversions
-------------------------------------------
A byte ``q < 128`` moved into bits 16..23 of ``0x3F000000`` is the fp32 number
``0.5 + q/256`` (``q < 256`` into bits 8..15: ``0.5 + q/65536`` for 8-bit codes). One PRMT
(byte permute, inline PTX on GPU; shifts and masks under the interpreter) makes it, one FFMA
multiplies it with the activation: ``t = sum x*(0.5 + q/256)``, so
``sum (q - z) * x = 256*t - (128 + z) * sum x``. The scale and zero are applied once per
group on the [rows, C] partial sums (GEMV), or on the exact integers ``q - z`` (|q - z| <= 255,
exact in fp16 and bf16) that feed ``tl.dot`` (tiled kernel). Accumulation is fp32 throughout;
the only rounding beyond fp32 is the final cast to the activation dtype, so the result is
closer to exact than the oracle's own fp16 weights.

Kernels
-------
* ``_gemv_kernel`` (M <= 4, one program per (row, row-tile, K split)): CUDA-core dot products,
  no shared memory; each thread keeps four units of several rows, so one activation load
  serves all of its rows.
* ``_tiled_kernel`` (M > 4): the same decode, exact ``q - z`` tiles, ``tl.dot`` (tensor cores)
  per quad of positions, fp32 scale per group on the product.
Both split K over programs when the output alone would not fill the GPU; the last program to
finish a tile (an atomic counter, reset by that program, so CUDA-graph replays stay valid)
sums the fp32 partials in a fixed order: results are deterministic.
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

__all__ = ["TritonWeight", "available", "repack", "quant_matmul", "PLANES"]

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

    qweight: torch.Tensor  # int32 [N, bits * Kp / 32]
    scale: torch.Tensor  # fp16 [K/G, N]
    zero: torch.Tensor  # uint8 [K/G, N]
    counters: torch.Tensor  # int32, split-K arrival counters; all zero between calls
    bits: int
    group_size: int  # G; K for per-channel
    n: int
    k: int
    c: int  # units per block: a K block holds 32 * c inputs
    kp: int  # K padded to a multiple of 32 * c

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self)


def _choose_c(k: int, g: int) -> tuple[int, int]:
    """Units per block C (a K block holds 32*C inputs) and K padded to a multiple of 32*C.

    C = 4: a program's threads each own one unit of several rows, so a scale group
    (G >= 128) is 32 positions of one unit and the per-row scale/zero work is paid once per
    32 weights; smaller groups fold every G/4 positions."""
    c = 4
    kp = -(-k // (32 * c)) * (32 * c)
    return c, kp


def repack(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int | None,
) -> TritonWeight:
    """Load-time repack of (codes uint8 [N, K], scale fp16 [N, K/G], zero uint8 [N, K/G])."""
    if bits not in PLANES:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    n, k = codes.shape
    g = k if group_size is None or group_size >= k else int(group_size)
    if k % 32 or k % g or g < 16 or (g != k and g & (g - 1)):
        raise ValueError(f"unsupported shape/group: K={k}, G={group_size} (need 32 | K, G a power of two >= 16 dividing K, or per-channel)")
    ng = k // g
    if scale.shape != (n, ng) or zero.shape != (n, ng):
        raise ValueError(f"scale/zero must be [{n}, {ng}], got {tuple(scale.shape)} / {tuple(zero.shape)}")
    c, kp = _choose_c(k, g)
    dev = codes.device
    q = codes.to(torch.int64)
    if kp != k:
        q = torch.nn.functional.pad(q, (0, kp - k))
    nb = kp // (32 * c)
    # [N, nb, 32 (j), C] -> [N, nb, C, 32]: unit c, position j
    q = q.view(n, nb, 32, c).transpose(2, 3)
    slots = []
    for pb, sp in PLANES[bits]:
        plane = (q >> sp) & ((1 << pb) - 1)  # [N, nb, C, 32]
        f_per = 8 // pb
        # position j = 4u + i, u = a*f_per + f  ->  [N, nb, C, a, f, i]
        plane = plane.reshape(n, nb, c, pb, f_per, 4)
        shifts = (8 * torch.arange(4, device=dev)).view(1, 1, 1, 1, 1, 4) + (pb * torch.arange(f_per, device=dev)).view(1, 1, 1, 1, f_per, 1)
        words = (plane << shifts).sum(dim=(4, 5))  # disjoint bits: sum == or; [N, nb, C, pb]
        slots.append(words.permute(0, 1, 3, 2))  # [N, nb, pb, C]
    w = torch.cat(slots, dim=2)  # [N, nb, bits, C]
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).reshape(n, bits * kp // 32).contiguous()
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
        c=c,
        kp=kp,
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
        """Byte I of q as fp32 0.5 + byte * 2^(8*POS - 24) (byte < 128 when POS == 2)."""
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
    def _load_rows(ptrs, mask, EVEN_N: tl.constexpr):
        if EVEN_N:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=mask, other=0)

    @triton.jit
    def _group(kb, u, G, NG, C: tl.constexpr, GPB: tl.constexpr, EVEN_K: tl.constexpr):
        """Scale group of quad u of block kb; GPB = groups per block (0: a group spans blocks)."""
        if GPB > 0:
            GC: tl.constexpr = 32 * C // GPB
            g = kb * GPB + (4 * C * u) // GC
        else:
            g = (kb * (32 * C)) // G
        if not EVEN_K:
            g = tl.minimum(g, NG - 1)
        return g

    @triton.jit
    def _fixup(part, ws_ptr, cnt_ptr, out_ptr, offs, mask, tile, pid_s, SPLIT, TILE_ELEMS):
        """Split-K: store the fp32 partial; the last program of a tile sums all, in order."""
        tl.store(ws_ptr + pid_s * TILE_ELEMS + offs, part, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            for s in range(1, SPLIT):
                total += tl.load(ws_ptr + s * TILE_ELEMS + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr,
        M, N, K, G, NG, NB, BLOCKS_PER_SPLIT, SPLIT, MAGIC,
        BITS: tl.constexpr, C: tl.constexpr, JG: tl.constexpr, BN: tl.constexpr,
        HAS_SPLIT: tl.constexpr, USE_ASM: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
        GPB: tl.constexpr,
        PB0: tl.constexpr, PB1: tl.constexpr, PB2: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        POS: tl.constexpr = 1 if BITS == 8 else 2
        MULT: tl.constexpr = 65536.0 if BITS == 8 else 256.0
        OFF: tl.constexpr = MULT * 0.5
        # slot offsets / code shifts of the planes (PB1/PB2 == 0: absent)
        O1: tl.constexpr = PB0
        O2: tl.constexpr = PB0 + PB1
        S1: tl.constexpr = PB0
        S2: tl.constexpr = PB0 + PB1
        F0: tl.constexpr = 8 // PB0
        F1: tl.constexpr = 8 // PB1 if PB1 > 0 else 1
        F2: tl.constexpr = 8 // PB2 if PB2 > 0 else 1

        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < N
        cols = tl.arange(0, C)
        row_words = BITS * NB * C  # int32 words per row
        w_row = w_ptr + rows.to(tl.int64)[:, None] * row_words + cols[None, :]
        wmask = rmask[:, None]
        x_row = x_ptr + pid_m.to(tl.int64) * K

        acc = tl.zeros([BN, C], dtype=tl.float32)
        QG: tl.constexpr = JG // 4  # quads per scale chunk
        kb0 = pid_s * BLOCKS_PER_SPLIT
        kb1 = tl.minimum(kb0 + BLOCKS_PER_SPLIT, NB)
        for kb in range(kb0, kb1):
            wb = w_row + kb * (BITS * C)
            xb = x_row + kb * (32 * C) + cols[None, :]
            t = tl.zeros([BN, C], dtype=tl.float32)
            xs = tl.zeros([1, C], dtype=tl.float32)
            for u in tl.static_range(8):
                if u % F0 == 0:
                    w0 = _load_rows(wb + (u // F0) * C, wmask, EVEN_N)
                qd = _field(w0, PB0, u % F0, 0)
                if PB1 > 0:
                    if u % F1 == 0:
                        w1 = _load_rows(wb + (O1 + u // F1) * C, wmask, EVEN_N)
                    qd = qd | _field(w1, PB1, u % F1, S1)
                if PB2 > 0:
                    if u % F2 == 0:
                        w2 = _load_rows(wb + (O2 + u // F2) * C, wmask, EVEN_N)
                    qd = qd | _field(w2, PB2, u % F2, S2)
                for i in tl.static_range(4):
                    if EVEN_K:
                        xj = tl.load(xb + (4 * u + i) * C).to(tl.float32)
                    else:
                        kk = kb * (32 * C) + (4 * u + i) * C + cols[None, :]
                        xj = tl.load(xb + (4 * u + i) * C, mask=kk < K, other=0.0).to(tl.float32)
                    t += _byte_f32(qd, MAGIC, i, POS, USE_ASM) * xj
                    xs += xj
                if (u + 1) % QG == 0:
                    g = _group(kb, u + 1 - QG, G, NG, C, GPB, EVEN_K)
                    if EVEN_N:
                        sc = tl.load(s_ptr + g * N + rows).to(tl.float32)
                        zp = tl.load(z_ptr + g * N + rows).to(tl.float32)
                    else:
                        sc = tl.load(s_ptr + g * N + rows, mask=rmask, other=0.0).to(tl.float32)
                        zp = tl.load(z_ptr + g * N + rows, mask=rmask, other=0).to(tl.float32)
                    sa = (sc * MULT)[:, None]
                    sb = (sc * (zp + OFF))[:, None]
                    # sum (q - z) x = MULT * t - (OFF + z) * sum x; the second term spread over C
                    xsum = tl.sum(tl.sum(xs, axis=1), axis=0) * (1.0 / C)
                    acc += t * sa - sb * xsum
                    t = tl.zeros([BN, C], dtype=tl.float32)
                    xs = tl.zeros([1, C], dtype=tl.float32)
        part = tl.sum(acc, axis=1)
        offs = pid_m * N + rows
        if not HAS_SPLIT:
            tl.store(out_ptr + offs, part.to(out_ptr.dtype.element_ty), mask=rmask)
        else:
            _fixup(part, ws_ptr, cnt_ptr, out_ptr, offs, rmask, pid_n * M + pid_m, pid_s, SPLIT, M * N)

    @triton.jit
    def _tiled_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr,
        M, N, K, G, NG, NB, BLOCKS_PER_SPLIT, SPLIT, MAGIC,
        BITS: tl.constexpr, C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        HAS_SPLIT: tl.constexpr, USE_ASM: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
        GPB: tl.constexpr,
        PB0: tl.constexpr, PB1: tl.constexpr, PB2: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        POS: tl.constexpr = 1 if BITS == 8 else 2
        MULT: tl.constexpr = 65536.0 if BITS == 8 else 256.0
        OFF: tl.constexpr = MULT * 0.5
        O1: tl.constexpr = PB0
        O2: tl.constexpr = PB0 + PB1
        S1: tl.constexpr = PB0
        S2: tl.constexpr = PB0 + PB1
        F0: tl.constexpr = 8 // PB0
        F1: tl.constexpr = 8 // PB1 if PB1 > 0 else 1
        F2: tl.constexpr = 8 // PB2 if PB2 > 0 else 1
        DT = x_ptr.dtype.element_ty

        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < N
        cols = tl.arange(0, C)
        row_words = BITS * NB * C
        w_row = w_ptr + rows.to(tl.int64)[:, None] * row_words + cols[None, :]
        wmask = rmask[:, None]
        ms = pid_m * BM + tl.arange(0, BM)
        mmask = ms < M
        # x tile of one quad: flat f = c*4 + i  <->  k = kbase + (4u + i)*C + c
        f = tl.arange(0, 4 * C)
        xoff = (f % 4) * C + f // 4
        x_rows = x_ptr + ms.to(tl.int64)[:, None] * K

        acc = tl.zeros([BM, BN], dtype=tl.float32)
        kb0 = pid_s * BLOCKS_PER_SPLIT
        kb1 = tl.minimum(kb0 + BLOCKS_PER_SPLIT, NB)
        for kb in range(kb0, kb1):
            wb = w_row + kb * (BITS * C)
            kbase = kb * (32 * C)
            for u in tl.static_range(8):
                if u % F0 == 0:
                    w0 = _load_rows(wb + (u // F0) * C, wmask, EVEN_N)
                qd = _field(w0, PB0, u % F0, 0)
                if PB1 > 0:
                    if u % F1 == 0:
                        w1 = _load_rows(wb + (O1 + u // F1) * C, wmask, EVEN_N)
                    qd = qd | _field(w1, PB1, u % F1, S1)
                if PB2 > 0:
                    if u % F2 == 0:
                        w2 = _load_rows(wb + (O2 + u // F2) * C, wmask, EVEN_N)
                    qd = qd | _field(w2, PB2, u % F2, S2)
                g = _group(kb, u, G, NG, C, GPB, EVEN_K)
                sc = tl.load(s_ptr + g * N + rows, mask=rmask, other=0.0).to(tl.float32)
                zo = tl.load(z_ptr + g * N + rows, mask=rmask, other=0).to(tl.float32) + OFF
                # exact integers q - z (|q - z| <= 255: exact in fp16 and bf16)
                d0 = (_byte_f32(qd, MAGIC, 0, POS, USE_ASM) * MULT - zo[:, None]).to(DT)
                d1 = (_byte_f32(qd, MAGIC, 1, POS, USE_ASM) * MULT - zo[:, None]).to(DT)
                d2 = (_byte_f32(qd, MAGIC, 2, POS, USE_ASM) * MULT - zo[:, None]).to(DT)
                d3 = (_byte_f32(qd, MAGIC, 3, POS, USE_ASM) * MULT - zo[:, None]).to(DT)
                wq = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), [BN, 4 * C])
                kk = kbase + 4 * u * C + xoff
                xt = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & (kk < K)[None, :], other=0.0)
                if USE_ASM:
                    part = tl.dot(xt, tl.trans(wq))
                else:  # the interpreter's bf16 dot is wrong (Triton 3.9): an exact fp32 one instead
                    part = tl.dot(xt.to(tl.float32), tl.trans(wq).to(tl.float32), input_precision="ieee")
                acc += part * sc[None, :]
        offs = ms[:, None] * N + rows[None, :]
        omask = mmask[:, None] & rmask[None, :]
        if not HAS_SPLIT:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            _fixup(acc, ws_ptr, cnt_ptr, out_ptr, offs, omask, pid_n * tl.num_programs(0) + pid_m, pid_s, SPLIT, M * N)


# ----------------------------------------------------------------------------- launch


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    if index < 0:
        return 8
    return torch.cuda.get_device_properties(index).multi_processor_count


def _gpb(w: TritonWeight) -> int:
    """Scale groups per K block, 0 when one group spans several blocks (or per-channel)."""
    return 32 * w.c // w.group_size if w.group_size <= 32 * w.c and w.group_size != w.k else 0


def _split(tiles: int, nb: int, sms: int, waves: float) -> tuple[int, int]:
    """(split, blocks per split): enough programs for about `waves` x SMs, no empty split."""
    want = max(1, min(nb, -(-int(waves * sms) // max(tiles, 1))))
    bps = -(-nb // want)
    return -(-nb // bps), bps


def _launch(x: torch.Tensor, w: TritonWeight, path: int = 0, bn: int | None = None, split: int | None = None,
            waves: float | None = None) -> torch.Tensor:
    """Launch one kernel; bn / split / waves override the heuristics (benchmark sweeps)."""
    m = x.shape[0]
    n, k = w.n, w.k
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    interp = _interpreting()
    use_asm = (not interp) and x.is_cuda
    sms = _num_sms(x.device.index if x.is_cuda else -1)
    nb = w.kp // (32 * w.c)
    planes = [pb for pb, _ in PLANES[w.bits]] + [0, 0]
    ng = k // w.group_size
    gemv = (m <= GEMV_MAX_M) if path == 0 else (path == 1)
    max_tiles = 4 * (-(-n // 16)) + 64  # what w.counters covers
    if gemv:
        # 4 warps; a thread holds 4 units (16 bytes) of a row, C/4 threads span a slot,
        # so a layout tile is 512/C rows: BN gives each thread 2..4 rows sharing one x load
        bn = bn or 256
        tiles = -(-n // bn) * m
        split, bps = _split(tiles, nb, sms, waves or 2.0) if split is None else (split, -(-nb // split))
        if tiles > max_tiles:
            split, bps = 1, nb
        ws = torch.empty((split, m, n) if split > 1 else (1,), dtype=torch.float32, device=x.device)
        jg = min(32, w.group_size // w.c)
        _gemv_kernel[(m, -(-n // bn), split)](
            x, w.qweight, w.scale, w.zero, out, ws, w.counters,
            m, n, k, w.group_size, ng, nb, bps, split, 0x3F000000,
            BITS=w.bits, C=w.c, JG=jg, BN=bn, HAS_SPLIT=split > 1, USE_ASM=use_asm, EVEN_K=w.kp == k,
            EVEN_N=n % bn == 0, GPB=_gpb(w),
            PB0=planes[0], PB1=planes[1], PB2=planes[2],
            num_warps=4,
        )
    else:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        bn = bn or 64
        mt, nt = -(-m // bm), -(-n // bn)
        split, bps = _split(mt * nt, nb, sms, waves or 2.0) if split is None else (split, -(-nb // split))
        if mt * nt > max_tiles:
            split, bps = 1, nb
        ws = torch.empty((split, m, n) if split > 1 else (1,), dtype=torch.float32, device=x.device)
        _tiled_kernel[(mt, nt, split)](
            x, w.qweight, w.scale, w.zero, out, ws, w.counters,
            m, n, k, w.group_size, ng, nb, bps, split, 0x3F000000,
            BITS=w.bits, C=w.c, BM=bm, BN=bn, HAS_SPLIT=split > 1, USE_ASM=use_asm, EVEN_K=w.kp == k,
            EVEN_N=n % bn == 0, GPB=_gpb(w),
            PB0=planes[0], PB1=planes[1], PB2=planes[2],
            num_warps=4,
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
    c: int,
    kp: int,
    path: int,
) -> torch.Tensor:
    w = TritonWeight(qweight, scale, zero, counters, bits, group_size, n, k, c, kp)
    return _launch(x.contiguous(), w, path)


@_quant_matmul_op.register_fake
def _(x, qweight, scale, zero, counters, bits, group_size, n, k, c, kp, path):
    return x.new_empty((x.shape[0], n))


def quant_matmul(x: torch.Tensor, w: TritonWeight, path: int = 0) -> torch.Tensor:
    """y = x @ dequant(w).T for x [..., K] fp16/bf16; y [..., N] in x's dtype.

    ``path``: 0 picks by M (GEMV for M <= 4, tiled otherwise), 1 forces GEMV, 2 tiled.
    """
    if x.shape[-1] != w.k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.k}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"activations must be fp16 or bf16, got {x.dtype}")
    lead = x.shape[:-1]
    y = torch.ops.slq.quant_matmul(
        x.reshape(-1, w.k), w.qweight, w.scale, w.zero, w.counters,
        w.bits, w.group_size, w.n, w.k, w.c, w.kp, path,
    )
    return y.reshape(*lead, w.n)
