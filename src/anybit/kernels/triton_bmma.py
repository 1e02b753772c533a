"""LUT linear on binary tensor cores: bit-plane codes times bit-plane activations, no decoding.

The codebook value of a b-bit code is a polynomial in the code's bits (its Moebius expansion):
``lut[r, q] = sum over T subset of bits(q) of coef[r, T]``, so with ``mask_T[r, k]`` the AND of the
bit planes ``p in T`` of row r at column k (all ones for the empty T)::

    y[m, r] = sum_k x[m, k] * lut[r, q(r, k)] = sum_T coef[r, T] * sum_k x[m, k] * mask_T[r, k]

The packed codes already are those bit planes (``anybit.formats.bitpack``: one int32 word per
row, chunk of 32 columns and bit), and a mask is one AND of plane words. With x as 24-bit fixed
point ``x = s_m * X``, ``X = sum_i w_i * bit_i(X)`` (two's complement: ``w_i = 2**i``, the sign
plane ``-2**23``), the inner sums are ``s_m * sum_i w_i * popcount(mask_T AND xplane_i)``: one
``mma.m16n8k256 .b1 .and.popc`` covers 16 rows x 256 columns x 8 planes, on the codes' words
(in the tiled order of ``anybit.kernels.tiling``: a warp's words of a tile contiguous). No weight is
ever decoded.

Exactness: the popcounts are integers (int32 accumulators, exact), weighted by their planes and
summed per thread in int32 and fp64 (exact below 2**53), then multiplied by the fp32 coefficients
and summed in fp64: ``y = s_m * sum_T coef[r, T] * Y_T``. The rounding that matters is x to 24
bits against the row's largest |x| (``anybit.kernels.xplanes``: ``s_m`` a power of two, so values
within 2**13 of the largest keep every fp16 mantissa bit) and the fp32 coefficients.

Work per 16 rows x 256 columns: ``2**b`` masks x 3 plane groups of 8 mma (b <= 3: one warp; 4 bits:
two warps, 8 masks each); a program's warps may also split K (``warps_for``), summing in shared
memory at the end, and a program may run two 16-row tiles back to back (``tiles_per_program``).
Widths 1..4 run here, wider blocks on ``triton_lut``'s kernels. Used by
``triton_lut.launch_blocks`` for up to 2 rows of x (3 or 4 where ``triton_mma`` cannot serve the
call: ``bmma_batch_limit``) when the blocks come with ``prepare_block``'s operands (``AnybitLinear``
keeps them instead of the stored codes on GPUs where this kernel runs: one copy), or with
``mode="bmma"``; measurements and what limits it: benchmarks/KERNEL_NOTES.md.

Two launches per call for up to two width blocks: ``xplanes.x_planes`` (portable Triton, also
under the interpreter) writes the planes of x once for all blocks of a matrix, then the Gluon
kernel (CUDA, sm_80+) runs both blocks' row tiles; one launch where the caller brings the planes
(``launch(planes=...)``: made by the op before the linear, ``xplanes.add_rms_norm_planes``).
``emulate`` is the same arithmetic in torch, for checks without a GPU.
"""

from __future__ import annotations

import functools

import torch
import triton

try:  # Gluon: explicit layouts, needed to hand the mma its operand fragments (Triton >= 3.5)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
except Exception:  # pragma: no cover - older Triton: the FMA kernels serve every width
    gluon = None

from anybit.kernels.tiling import KTILE, tile_codes
from anybit.kernels.launcher import KernelLaunch
from anybit.kernels.xplanes import (
    MAX_KSPLIT, XTILE_WORDS, XPlanesLaunch, plane_chunks, plane_weights, plane_words,
)

MAX_BITS = 4  # widths served here
# Registers a thread. 128 let 4 warps share a scheduler's register file instead of 3: a third more warps
# in flight, and one wave where it was 1.13 (tall matrices). A launch that takes no more waves at 3 warps
# a scheduler gets 168: ptxas then uses ~142-154, keeps the all-ones mask in registers (3-bit loop 134 ->
# 128 instructions a tile) and never spills (4-bit and mixed launches spill 24-32 bytes at 128).
# Offline SASS and H100 sweeps: KERNEL_NOTES "Ninth session", "Fifteenth session".
MAX_REGISTERS = 128
ROOMY_REGISTERS = 168
MAX_WARPS_PER_SM = 16  # 4 a scheduler at 128 registers (64K registers a multiprocessor)
ROOMY_WARPS_PER_SM = 12  # 3 a scheduler at <= 168 registers
# ~Half of one wave at 16 warps a multiprocessor (H100, 128 registers): launches up to this size gain from
# a K split across warps and from deeper copy stages, larger ones lose (``warps_for``, ``stages_for``)
SMALL_LAUNCH_WARPS = 1100


@functools.lru_cache(maxsize=None)
def _multiprocessors(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if torch.cuda.is_available() else 132


def registers_for(warps: int, device=None) -> int:
    """maxnreg for a launch of ``warps`` warps in all: ROOMY_REGISTERS unless that takes more waves
    (ROOMY_WARPS_PER_SM a multiprocessor; 132 multiprocessors without a GPU) than MAX_REGISTERS
    (MAX_WARPS_PER_SM) -- so also for 2,113-3,168 warps on 132 multiprocessors, where the second
    wave is there either way (2,752-3,072 warps: 22016x4096 at 4 bits 9% and 3.25 bits 2% faster at batch
    1, 11008x4096 and 12288x4096 at 4 and 3.25 bits 2-5% at batch 2; H100, KERNEL_NOTES "Fifteenth
    session")."""
    sms = _multiprocessors(device)
    roomy_waves = -(-warps // (ROOMY_WARPS_PER_SM * sms))
    return ROOMY_REGISTERS if roomy_waves <= -(-warps // (MAX_WARPS_PER_SM * sms)) else MAX_REGISTERS


def available() -> bool:
    return gluon is not None


def subset_coefficients(lut: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 (rows, 2**bits): ``coef[r, T]`` with ``lut[r, q] = sum_{T subset q} coef[r, T]``
    (T and q as bit sets), the Moebius transform of each row's first 2**bits entries."""
    c = lut[:, : 2**bits].to(torch.float64).clone()
    n = 2**bits
    for p in range(bits):
        idx = torch.arange(n, device=lut.device)
        has = idx[(idx >> p) & 1 == 1]
        c[:, has] -= c[:, has ^ (1 << p)]
    return c.to(torch.float32).contiguous()


def prepare_block(codes: torch.Tensor, lut: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel reads of a width block besides x: (subset coefficients, tiled codes). A
    caller that runs a block repeatedly makes it once and passes it with the block; the tiled
    codes are a second copy of the codes."""
    return subset_coefficients(lut, bits), tile_codes(codes, bits)


# ----------------------------------------------------------------------------- reference arithmetic


def emulate(xpl, xs, codes, coef, bits: int, in_features: int) -> torch.Tensor:
    """fp32 (M, rows) that the Gluon kernel computes, in torch (any device): masks of the code
    planes times the integer x planes, exact sums, then the coefficients."""
    from anybit.formats.bitpack import unpack_bitplanes

    q = unpack_bitplanes(codes, bits, in_features).long()  # (rows, K)
    xpl = plane_words(xpl)  # (M, 24, chunks)
    cols = torch.arange(in_features, device=xpl.device)
    xbits = (xpl.long()[:, :, cols // 32] >> (cols % 32)) & 1  # (M, 24, K)
    X = (xbits.double() * plane_weights(xpl.device)[None, :, None]).sum(1)  # (M, K), exact
    y = torch.zeros(xpl.shape[0], codes.shape[0], dtype=torch.float64, device=xpl.device)
    for t in range(2**bits):
        mask = ((q & t) == t).double()  # all bits of T set in the code
        y += (X @ mask.t()) * coef[:, t].double()[None, :]
    return (y * xs.double()[:, None]).float()


# ----------------------------------------------------------------------------- Gluon kernel

if gluon is not None:
    # Fragment order (``tiling``): lane 4g + t holds rows 2g, 2g + 1 and chunks 2t, 2t + 1 of a (rows, chunks)
    # tile, its registers in the order the mma takes them. The mma's row g is our row 2g, its row g + 8 our
    # row 2g + 1, its 32-column segments t and t + 4 our chunks 2t and 2t + 1 (any order of rows and
    # segments works if A and B agree): registers (2g, 2t), (2g + 1, 2t), (2g, 2t + 1), (2g + 1, 2t + 1) are
    # a0..a3, one 16-byte load from shared memory, used in place. B, plane g of chunks 2t, 2t + 1, is the
    # first two registers of the x tensor ("lo"), plane g + 8 the last two ("hi"; ``x_planes`` stores them
    # so). D (row, plane 2t + j) sits at chunk column 2t + j: an accumulator element (r, c) counts row r
    # against plane c of its group of 8; in our register order D's c0..c3 are registers 0, 2, 1, 3.
    _XTILE_WORDS = gl.constexpr(XTILE_WORDS)
    _BMMA_LO = gl.constexpr("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
                            "{$0,$2,$1,$3}, {$4,$5,$6,$7}, {$8,$9}, {$12,$14,$13,$15};")
    _BMMA_HI = gl.constexpr("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
                            "{$0,$2,$1,$3}, {$4,$5,$6,$7}, {$10,$11}, {$12,$14,$13,$15};")

    @gluon.jit
    def _bmma(masks, xw, acc, ASM: gl.constexpr):
        return gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r", [masks, xw, acc],
                                         dtype=gl.int32, is_pure=True, pack=4)

    # (row, chunk) steps of lane bits 0..4: lane 4g + t holds rows 2g, 2g + 1 at chunks 2t, 2t + 1
    _TILE_LANES = [[0, 2], [0, 4], [2, 0], [4, 0], [8, 0]]
    # (row, chunk) steps of the word offset's bits 0..6 within a tile (``tiling``): 16 * (r // 2) + 2 * c + r % 2
    _TILE_WORDS = [[1, 0], [0, 1], [0, 2], [0, 4], [2, 0], [4, 0], [8, 0]]

    @gluon.constexpr_function
    def _fragment_layout(ks, t, wt):
        """(KS, T, 16, 8) in fragment order, T (masks) over ``wt`` warps then the warps along K: the
        threads, warps and elements of ``_epilogue_layout``, registers in the mma's order."""
        reg = [[0, 0, 1, 0], [0, 0, 0, 1]] + [[0, wt << b, 0, 0] for b in range((t // wt).bit_length() - 1)]
        warp = [[0, 1 << b, 0, 0] for b in range(wt.bit_length() - 1)]
        warp = warp + [[1 << b, 0, 0, 0] for b in range(ks.bit_length() - 1)]
        return gl.DistributedLinearLayout(reg, [[0, 0] + b for b in _TILE_LANES], warp, [], [ks, t, 16, 8])

    @gluon.constexpr_function
    def _epilogue_layout(ks, wt):
        """``_fragment_layout`` as a blocked layout (chunk registers first), for the sums across
        threads; converting between the two renames registers only."""
        return gl.BlockedLayout([1, 1, 2, 2], [1, 1, 8, 4], [ks, wt, 1, 1], [3, 2, 1, 0])

    @gluon.constexpr_function
    def _word_layout(ks):
        """Shared memory of (warp along K, 16 rows, 8 chunks) words of one plane in ``tiling``'s order:
        a warp's 512 bytes contiguous, a lane's four words one 16-byte read, no bank conflicts."""
        bases = [[0] + b for b in _TILE_WORDS]
        return gl.SharedLinearLayout(bases + [[1 << b, 0, 0] for b in range(ks.bit_length() - 1)])

    @gluon.constexpr_function
    def _copy_layout(ks, planes):
        """Shared memory of what one copy writes, (planes, KS, 32 lanes, 4 words) row-major: the same
        bytes as ``planes`` consecutive ``_word_layout`` buffers."""
        bases = [[0, 0, 0, 1], [0, 0, 0, 2]] + [[0, 0, 1 << b, 0] for b in range(5)]
        bases = bases + [[0, 1 << b, 0, 0] for b in range(ks.bit_length() - 1)]
        return gl.SharedLinearLayout(bases + [[1 << b, 0, 0, 0] for b in range(planes.bit_length() - 1)])

    @gluon.jit
    def _pair_sum(v, odd, LG: gl.constexpr):
        """(KS, T, rows, 4) in layout LG: ``a + odd * b`` over the column pairs (a, b) = (2t, 2t + 1) of
        v (KS, T, rows, 8) that one thread holds (no shuffles); odd: (1, 1, 1, 4) in LG's layout."""
        a, b = gl.split(gl.reshape(v, [v.shape[0], v.shape[1], v.shape[2], 4, 2]))
        return gl.convert_layout(a, LG) + gl.convert_layout(b, LG) * odd

    @gluon.jit
    def _masks(w0, w1, w2, w3, tt, BITS: gl.constexpr):
        """(KS, T, R, 8) mask words: AND of the planes p in T (tt: the T index, (1, T, 1, 1))."""
        m = w0[:, None, :, :] | (((tt >> 0) & 1) - 1)
        if BITS > 1:
            m = m & (w1[:, None, :, :] | (((tt >> 1) & 1) - 1))
        if BITS > 2:
            m = m & (w2[:, None, :, :] | (((tt >> 2) & 1) - 1))
        if BITS > 3:
            m = m & (w3[:, None, :, :] | (((tt >> 3) & 1) - 1))
        return m

    @gluon.jit
    def _copy_offsets(P: gl.constexpr, KS: gl.constexpr, LP: gl.constexpr):
        """(P, KS, 32, 4) plane index, (1, KS, 1, 1) warp along K and (1, 1, 32, 4) word offset in a
        tile's 128 words (lane-major: ``tiling``'s fragment order), in the copy layout LP."""
        pp = gl.arange(0, P, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LP))))[:, None, None, None]
        kk = gl.arange(0, KS, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, LP))))[None, :, None, None]
        ll = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LP))))[None, None, :, None]
        jj = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LP))))[None, None, None, :]
        return pp, kk, ll * 4 + jj

    @gluon.jit
    def _issue_stage(smem, xsm, stage, tbase, woff0, woff1, xptr, kt, ktx, KT, KTP, BITS: gl.constexpr,
                     P0: gl.constexpr):
        """Start copying the plane words of mma tiles ``kt`` (one per warp along K, (1, KS, 1, 1);
        ``ktx`` the same in the x copy's layout) and their x planes into ``stage``: planes [0, P0) in
        one copy, the rest (3 bits: plane 2) in a second, both x tensors in a third (a barrier
        precedes every copy into an allocation, and the no-op instructions ptxas puts after each).
        Tiles past the matrix read its last tile again (x planes past KT are zero)."""
        kc = gl.minimum(kt, KT - 1).to(gl.int64) * (BITS * 128)
        words = smem.index(stage)
        async_copy.async_copy_global_to_shared(words.slice(0, P0), tbase + kc + woff0)
        if BITS > P0:
            async_copy.async_copy_global_to_shared(words.slice(P0, BITS - P0), tbase + kc + woff1)
        async_copy.async_copy_global_to_shared(xsm.index(stage), xptr + gl.minimum(ktx, KTP - 1) * _XTILE_WORDS)
        async_copy.commit_group()

    @gluon.jit
    def _next_copy(itn, tn, tb, tlast, n_it, tile_words, TPP: gl.constexpr):
        """The copy after iteration ``itn`` of tile ``tn`` (its codes at ``tb``): the next iteration,
        the next tile's first after a tile's last, and after the program's last step that step again
        (L2-hot, never multiplied). One tile a program: past its end ``_issue_stage``'s clamps re-read
        the last mma tile (no wrap: 10 fewer instructions a step)."""
        itn += 1
        if TPP > 1:
            if itn == n_it:
                if tn < tlast:
                    itn = 0
                    tn += 1
                    tb += tile_words
                else:
                    itn = n_it - 1
        return itn, tn, tb

    @gluon.jit
    def _bmma_rows(m, tile0, xpl_ptr, xs_ptr, codes_ptr, coef_ptr, ridx_ptr, y_ptr, R, KT, KTP, stride_pm,
                   stride_ym, BITS: gl.constexpr, KS: gl.constexpr, STAGES: gl.constexpr, HAS_RIDX: gl.constexpr,
                   TPP: gl.constexpr):
        """Rows [tile0 * 16, +16 * TPP) of one width block against row m of x, one 16-row tile after
        the other through one ring of copies (the next tile's first copies in flight during a tile's
        epilogue): codes tiled by ``tile_codes``, x planes padded with zeros to KTP mma tiles (a
        multiple of KS). Warps: KS along K (warp k takes mma tiles k, k + KS, ...; their sums meet in
        shared memory at the end, no workspace), 2**BITS / 8 along the masks (4 bits)."""
        T: gl.constexpr = 2**BITS
        WT: gl.constexpr = T // 8 if T > 8 else 1
        LF: gl.constexpr = _fragment_layout(KS, T, WT)  # (KS, T, rows, chunks): masks, accumulators
        LW: gl.constexpr = gl.SliceLayout(1, LF)  # (KS, rows, chunks): code and plane words
        L4: gl.constexpr = _epilogue_layout(KS, WT)  # the same, for the sums after the loop
        LT: gl.constexpr = gl.SliceLayout(3, L4)  # (KS, T, rows): sums per mask
        LC: gl.constexpr = gl.SliceLayout(0, LT)  # (T, rows): coefficients
        # copies: (planes, KS, 32 lanes, 4 words), 16 bytes a lane, the planes of a 4-bit tile over its two warps.
        # x planes in 8-byte copies: every program reads them, and only copies under 16 bytes go through L1
        # (Triton makes 16-byte ones cp.async.cg, which bypasses it: batch 1 up to 15% slower, H100 A/B)
        LPX: gl.constexpr = gl.BlockedLayout([1, 1, 1, 2], [1, 1, 16, 2], [WT, KS, 1, 1], [3, 2, 1, 0])
        LP: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 1, 32, 1], [WT, KS, 1, 1], [3, 2, 1, 0])
        P0: gl.constexpr = 4 if BITS == 4 else (2 if BITS >= 2 else 1)  # planes of the first copy
        BP: gl.constexpr = 4 if BITS == 3 else BITS  # planes a stage holds: shapes are powers of two
        pp, kk, word = _copy_offsets(P0, KS, LP)
        woff0 = pp * 128 + word
        woff1 = (_copy_offsets(1, KS, LP)[0] + P0) * 128 + word  # the second copy (3 bits: plane 2)
        tt = gl.arange(0, T, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, LF))))[None, :, None, None]
        # x planes (``x_planes``): an mma tile's two 128-word halves, planes g and 8 + g, then 16 + g
        xsel, kkx, xword = _copy_offsets(2, KS, LPX)
        xptr = xpl_ptr + m * stride_pm + xsel * 128 + xword
        # the rows' coefficients travel with the first stage and x's scale is loaded now, not at the
        # end (a dependent load there cost 1-2 us a call on 4096-row matrices); the row indices stay
        # at the end (loaded early, or copied with the coefficients, they push 4-bit launches into spills)
        tc = gl.arange(0, T, layout=gl.SliceLayout(1, LC))
        csm = gl.allocate_shared_memory(gl.float32, [TPP, T, 16], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        for j in gl.static_range(TPP):
            rt = (tile0 + j) * 16 + gl.arange(0, 16, layout=gl.SliceLayout(0, LC))
            rtm = rt < R
            async_copy.async_copy_global_to_shared(csm.index(j), coef_ptr + gl.where(rtm, rt, 0).to(gl.int64)[None, :]
                                                   * T + tc[:, None], mask=rtm[None, :])
        xscale = gl.load(xs_ptr + m)
        # code words and x planes of the next STAGES - 1 steps are in flight while a step is
        # multiplied (latency x bandwidth), copied to shared memory without holding registers.
        smem = gl.allocate_shared_memory(gl.int32, [STAGES, BP, KS, 32, 4], _copy_layout(KS, BP))
        xsm = gl.allocate_shared_memory(gl.int32, [STAGES, 2, KS, 32, 4], _copy_layout(KS, 2))
        # the same bytes as one (KS, 16, 8) buffer a plane, for the loads
        wsm = smem._reinterpret(gl.int32, [STAGES * BP, KS, 16, 8], _word_layout(KS))
        xsm1 = xsm._reinterpret(gl.int32, [STAGES * 2, KS, 16, 8], _word_layout(KS))
        # the next copy: iteration itn of tile tn, whose codes (``tile_codes``: 16-row tile, mma tile, plane,
        # 128 words in fragment order) start at tb; a program's tiles are consecutive there
        n_it = gl.cdiv(KT, KS)
        tile_words = KT * BITS * 128
        tlast = gl.minimum(tile0 + TPP, gl.cdiv(R, 16)) - 1
        tn = tile0
        tb = codes_ptr + tile0.to(gl.int64) * tile_words
        itn = 0
        for i in gl.static_range(STAGES - 1):  # the coefficients join the first group
            _issue_stage(smem, xsm, i, tb, woff0, woff1, xptr, itn * KS + kk, itn * KS + kkx, KT, KTP, BITS, P0)
            itn, tn, tb = _next_copy(itn, tn, tb, tlast, n_it, tile_words, TPP)
        stage = 0
        for j in gl.static_range(TPP):
            acc0 = gl.zeros([KS, T, 16, 8], gl.int32, LF)
            acc1 = gl.zeros([KS, T, 16, 8], gl.int32, LF)
            acc2 = gl.zeros([KS, T, 16, 8], gl.int32, LF)
            for it in range(0, n_it):
                nxt = stage - 1  # (stage + STAGES - 1) % STAGES; a signed % costs 5 instructions a step
                if nxt < 0:
                    nxt = STAGES - 1
                _issue_stage(smem, xsm, nxt, tb, woff0, woff1, xptr, itn * KS + kk, itn * KS + kkx, KT, KTP, BITS,
                             P0)
                itn, tn, tb = _next_copy(itn, tn, tb, tlast, n_it, tile_words, TPP)
                async_copy.wait_group(STAGES - 1)
                w0 = wsm.index(stage * BP).load(LW)
                w1 = w0
                w2 = w0
                w3 = w0
                if BITS > 1:
                    w1 = wsm.index(stage * BP + 1).load(LW)
                if BITS > 2:
                    w2 = wsm.index(stage * BP + 2).load(LW)
                if BITS > 3:
                    w3 = wsm.index(stage * BP + 3).load(LW)
                xa = xsm1.index(stage * 2).load(LW)[:, None, :, :]
                xb = xsm1.index(stage * 2 + 1).load(LW)[:, None, :, :]
                mk = _masks(w0, w1, w2, w3, tt, BITS)
                acc0 = _bmma(mk, xa, acc0, _BMMA_LO)
                acc1 = _bmma(mk, xa, acc1, _BMMA_HI)
                acc2 = _bmma(mk, xb, acc2, _BMMA_LO)
                stage += 1
                if stage == STAGES:
                    stage = 0
            if j == TPP - 1:
                async_copy.wait_group(0)
            _bmma_epilogue(acc0, acc1, acc2, csm.index(j), xscale, m, tile0 + j, ridx_ptr, y_ptr, R, stride_ym, KS,
                           T, WT, HAS_RIDX)

    @gluon.jit
    def _bmma_epilogue(acc0, acc1, acc2, csm, xscale, m, tile, ridx_ptr, y_ptr, R, stride_ym, KS: gl.constexpr,
                       T: gl.constexpr, WT: gl.constexpr, HAS_RIDX: gl.constexpr):
        """Rows [tile * 16, +16) of y from a tile's accumulators (``_bmma_rows``) and its coefficients
        in shared memory (csm: (T, 16))."""
        L4: gl.constexpr = _epilogue_layout(KS, WT)
        LC: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(3, L4))  # (T, rows)
        rt = tile * 16 + gl.arange(0, 16, layout=gl.SliceLayout(0, LC))
        rtm = rt < R
        # accumulator column c = 2t + j of group g counts plane 8g + c, weight 2**(8g + c) (the sign plane
        # -2**23). Lane t holds columns 2t, 2t + 1 of every mask and group, so its common factor 4**t waits
        # until its sum over the masks: per element it weights the pair as a + 2b (the sign plane's pair,
        # t = 3 of group 2: a - 2b) and joins groups 0 and 1 as g0 + 256 g1 in int32 (exact: each count is
        # at most K, so below 2**31 for K < 2.7M), then group 2 in fp64 (exact below 2**53), multiplies by
        # the row's coefficient and sums the masks; only then the sums cross threads (the plane columns
        # over 4 lanes, then the warps along K): one value per row crosses (KERNEL_NOTES "Ninth session";
        # the factored weights halve the epilogue's instructions, "Thirteenth session").
        LG: gl.constexpr = gl.SliceLayout(4, gl.BlockedLayout([1, 1, 2, 1, 2], [1, 1, 8, 4, 1], [KS, WT, 1, 1, 1],
                                                              [4, 3, 2, 1, 0]))  # (KS, T, rows, 4 lanes)
        t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LG))))[None, None, None, :]
        g01 = _pair_sum(gl.convert_layout(acc0, L4), 2, LG) + (_pair_sum(gl.convert_layout(acc1, L4), 2, LG) << 8)
        g2 = _pair_sum(gl.convert_layout(acc2, L4), gl.where(t == 3, -2, 2), LG)
        coef = csm.load(gl.SliceLayout(0, gl.SliceLayout(3, LG))).to(gl.float64)[None, :, :, None]  # (1, T, rows, 1)
        lane = gl.sum((g01.to(gl.float64) + g2.to(gl.float64) * 65536.0) * coef, axis=1)  # (KS, rows, 4 lanes)
        LL: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(1, LG)))
        lane_weight = (1 << (2 * gl.arange(0, 4, layout=LL))).to(gl.float64)[None, None, :]  # 4**t
        y = gl.sum(gl.sum(lane * lane_weight, axis=2), axis=0)  # (rows,)
        y = gl.convert_layout(y, gl.SliceLayout(0, LC)) * xscale.to(gl.float64)
        if HAS_RIDX:
            dst = gl.load(ridx_ptr + rt, mask=rtm, other=0)
        else:
            dst = rt
        gl.store(y_ptr + m * stride_ym + dst, y.to(y_ptr.dtype.element_ty), mask=rtm)

    @gluon.jit
    def _bmma_kernel(xpl_ptr, xs_ptr, y_ptr, KT, KTP, stride_pm, stride_ym,
                     codes_a, coef_a, ridx_a, rows_a, progs_a, codes_b, coef_b, ridx_b, rows_b,
                     BITS_A: gl.constexpr, KS_A: gl.constexpr, RIDX_A: gl.constexpr,
                     BITS_B: gl.constexpr, KS_B: gl.constexpr, RIDX_B: gl.constexpr, STAGES: gl.constexpr,
                     TPP: gl.constexpr):
        """Program (m, p): TPP consecutive 16-row tiles of block a (programs [0, progs_a)) or of block
        b (the rest; BITS_B = 0: no block b), so that a mixed-width matrix is one launch."""
        m = gl.program_id(0)
        p = gl.program_id(1)
        if BITS_B == 0:
            _bmma_rows(m, p * TPP, xpl_ptr, xs_ptr, codes_a, coef_a, ridx_a, y_ptr, rows_a, KT, KTP, stride_pm,
                       stride_ym, BITS_A, KS_A, STAGES, RIDX_A, TPP)
        elif p < progs_a:
            _bmma_rows(m, p * TPP, xpl_ptr, xs_ptr, codes_a, coef_a, ridx_a, y_ptr, rows_a, KT, KTP, stride_pm,
                       stride_ym, BITS_A, KS_A, STAGES, RIDX_A, TPP)
        else:
            _bmma_rows(m, (p - progs_a) * TPP, xpl_ptr, xs_ptr, codes_b, coef_b, ridx_b, y_ptr, rows_b, KT, KTP,
                       stride_pm, stride_ym, BITS_B, KS_B, STAGES, RIDX_B, TPP)


# ----------------------------------------------------------------------------- launcher


def warps_for(widths_rows, ktiles: int, batch: int) -> int:
    """Warps of a program for the blocks (bits, rows) of one launch: 2**bits / 8 along the masks
    (2 for 4 bits) times KS along K, KS doubling while the launch stays under ~1100 warps (half of
    one wave at 16 warps a multiprocessor on the H100, 128 registers) and every warp keeps >= 8
    mma tiles; beyond that the fixed cost of a program (first loads, sums across warps) outweighs
    the parallelism (H100 sweeps, benchmarks/KERNEL_NOTES.md)."""
    masks = [2 if bits == 4 else 1 for bits, _ in widths_rows]
    warps = batch * sum(wt * -(-rows // 16) for wt, (_, rows) in zip(masks, widths_rows))
    # every block splits the program's warps along K: a 3-bit partner of a 4-bit block takes twice its K split
    most = MAX_KSPLIT * min(masks) // max(masks)
    ks = 1
    while ks < most and warps * ks * 2 <= SMALL_LAUNCH_WARPS and ktiles >= 16 * ks:
        ks *= 2
    return max(masks) * ks


def stages_for(widths, ktiles: int, warps: int) -> int:
    """Copy stages (STAGES - 1 mma tiles in flight) of a launch of width blocks ``widths`` over
    ``ktiles`` mma tiles a row, ``warps`` warps in all. One block: 4. Two: 5 on rows of >= 32 mma
    tiles with a 4-bit block (3.25-bit down projections: 2-3% faster than 4 and 3-4% than 3 at
    batch 1, 7-8% than 3 at batch 2); else 4 while the launch fits SMALL_LAUNCH_WARPS (2.25 bits and
    4096x4096: up to 4% faster than 3), 3 above (the tall 3.25-bit and 2.25-bit launches: 3 is 1-4%
    faster than 4). H100 sweeps: KERNEL_NOTES "Fourteenth session"."""
    if len(widths) == 1:
        return 4
    if max(widths) == 4 and ktiles >= 32:
        return 5
    return 4 if warps <= SMALL_LAUNCH_WARPS else 3


def tiles_per_program(widths, batch: int, warps: int, device=None) -> int:
    """16-row tiles a program runs back to back (``_bmma_rows``) in a launch of width blocks
    ``widths`` for ``batch`` rows of x that has ``warps`` warps at one tile a program. 2 where a batch-1
    launch of one block of up to 3 bits is too large for one wave at ROOMY_REGISTERS but its half is
    not (28672 rows at 2 or 3 bits: half the programs, one wave at 168 registers instead of 128, one
    epilogue in flight behind the next tile's copies: 1-1.5% and 3.5-5% faster); else 1. Two tiles
    lose wherever the launch already fits one wave at ROOMY_REGISTERS (4-26%: half the warps in
    flight), at batch 2 (the second row's codes come from L2: 2-3%), with 4-bit or two blocks
    (1-9%). H100 sweep: KERNEL_NOTES "Fifteenth session"."""
    roomy = ROOMY_WARPS_PER_SM * _multiprocessors(device)
    if len(widths) == 1 and max(widths) <= 3 and batch == 1 and roomy < warps <= 2 * roomy:
        return 2
    return 1


class BmmaLaunch:
    """``launch``'s work for the width blocks ``(codes, lut, bits, row_index[, prepared])`` (bits <= 4) of
    one matrix and ``batch`` rows of x on ``device``, worked out once: blocks in launch order, each
    launch's warps, stages, registers, tiles a program and grid, and its arguments but x's planes and y
    (``launcher.KernelLaunch``: after the first call no pass through Triton's dispatch). ``prepared``:
    ``prepare_block(codes, lut, bits)``, made here when absent or None (with it the codes may be None).
    ``input_scale``: what x is divided by per column, for the planes made here. ``config``: (warps per
    program, STAGES[, maxnreg[, tiles a program]]), a 0 for the rule's choice: ``warps_for``,
    ``stages_for``, ``registers_for``, ``tiles_per_program``. Blocks go two to a launch. A call
    ``(x2, y2, planes=None)`` writes every block's rows of y2 (batch, out) from x2 (batch, in), with
    ``planes`` (``x_planes(x2, input_scale)``) when already made for this x."""

    def __init__(self, blocks, in_features: int, batch: int, device, input_scale=None, config=None):
        # widest first: a program of a 4-bit tile has twice the masks of a 3-bit one, and programs start
        # in order, so the long ones start first (3.25 bits on the H100: 1-8% faster, KERNEL_NOTES v10)
        blocks = sorted((b for b in blocks if b[1].shape[0] > 0), key=lambda b: -b[2])
        ktp = plane_chunks(in_features) // KTILE
        self.batch, self.ktp, self.launches, self.planes = batch, ktp, [], None
        if not (batch and blocks):
            return
        self.planes = XPlanesLaunch(batch, in_features, device, input_scale)
        ktiles = -(-in_features // (32 * KTILE))
        # what each call brings (x's planes, y) stands on the meta device until then
        xpl = torch.empty(batch, ktp, XTILE_WORDS, dtype=torch.int32, device="meta")
        xs, y = torch.empty(batch, device="meta"), torch.empty(batch, 1, device="meta")
        for i in range(0, len(blocks), 2):
            pair = blocks[i:i + 2]
            args, consts = [], {}
            nw, stages, maxnreg, tpp = (tuple(config or ()) + (0, 0, 0, 0))[:4]
            widths = [b[2] for b in pair]
            tiles = [triton.cdiv(b[1].shape[0], 16) for b in pair]
            nw = nw or warps_for([(b[2], b[1].shape[0]) for b in pair], ktiles, batch)
            warps = batch * sum(tiles) * nw  # at one tile a program
            stages = stages or stages_for(widths, ktiles, warps)
            tpp = tpp or tiles_per_program(widths, batch, warps, device)
            progs = [triton.cdiv(t, tpp) for t in tiles]
            for name, block in zip("AB", pair):
                codes, lut, bits, row_index = block[:4]
                prepared = block[4] if len(block) > 4 and block[4] is not None else prepare_block(codes, lut, bits)
                coef, tiled = prepared
                ks = nw // (2 if bits == 4 else 1)
                if ks < 1 or MAX_KSPLIT % ks:
                    raise ValueError(f"{nw} warps do not split a {bits}-bit block along K into 1..{MAX_KSPLIT}")
                args += [tiled, coef, row_index.contiguous() if row_index is not None else tiled, lut.shape[0]]
                if name == "A":
                    args.append(progs[0])
                consts.update({f"BITS_{name}": bits, f"KS_{name}": ks, f"RIDX_{name}": row_index is not None})
            if len(pair) == 1:
                args += [coef, coef, coef, 0]
                consts.update(BITS_B=0, KS_B=1, RIDX_B=False)
            maxnreg = maxnreg or registers_for(batch * sum(progs) * nw, device)
            args = [xpl, xs, y, ktiles, ktp, xpl.stride(0), y.stride(0), *args,
                    *(consts[f"{c}_{n}"] for n in "AB" for c in ("BITS", "KS", "RIDX")), stages, tpp]
            self.launches.append(KernelLaunch(_bmma_kernel, (batch, sum(progs)), args,
                                              {"num_warps": nw, "maxnreg": maxnreg},
                                              ("xpl_ptr", "xs_ptr", "y_ptr", "stride_pm", "stride_ym")))

    def __call__(self, x2: torch.Tensor, y2: torch.Tensor, planes=None) -> torch.Tensor:
        if not self.launches:
            return y2
        xpl, xs = planes if planes is not None else self.planes(x2)
        if xpl.shape[:2] != (self.batch, self.ktp):
            raise ValueError(f"x planes of shape {tuple(xpl.shape)} for {self.batch} rows of {self.ktp} mma tiles")
        for launch in self.launches:
            launch(xpl, xs, y2, xpl.stride(0), y2.stride(0))
        return y2


def launch(x2, blocks, in_features, y2, input_scale=None, *, planes=None, config=None):
    """Write every width block ``(codes, lut, bits, row_index[, prepared])`` (bits <= 4) of one
    matrix into y2 (M, out) from x2 (M, in); return y2. ``planes``: ``x_planes(x2, input_scale)``
    when already made for this x. ``BmmaLaunch`` says what the rest means, and keeps this work for
    calls made again."""
    return BmmaLaunch(blocks, in_features, x2.shape[0], x2.device, input_scale, config)(x2, y2, planes)
