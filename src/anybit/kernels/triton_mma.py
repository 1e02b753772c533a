"""LUT linear on fp16 tensor cores: codes decoded straight into ``mma.sync`` fragments.

Each thread decodes exactly the weights its A fragment holds, from registers, and hands them to
``mma.sync.m16n8k16`` (fp16 x fp16, fp32 accumulation) with x as the B operand: no weight ever
goes through shared memory, and the tensor cores do the multiply-adds, so a weight costs its
decoding alone (~4 instructions for 3 bits, against ~8 in the FMA kernel) whatever the batch (up
to 16 rows of x: two mma per fragment past 8).

Fragments: an mma takes 16 rows x 16 columns; thread (g, t) (lane 4g + t) holds rows g, g + 8 and
k slots 2t, 2t + 1, 2t + 8, 2t + 9. The k slots can stand for any columns as long as x's B
fragment uses the same ones, so in a step of 128 columns (4 chunks of 32) thread t's slots of
the j-th mma (j = 0..7) are columns j, j + 8, j + 16, j + 24 of chunk t: the four codes that one
shift and mask per bit plane put in the bytes of one word (``triton_lut._code4``), and every
thread reads only its own chunk's plane words. Two PRMT-based picks per pair of weights turn the
codes into their fp16 codebook entries (the row's codebook sits in registers, two entries a
word). x is re-ordered once per call to match (``x_fragments``: one small torch copy): word
[m, c, j, i] is the half2 of columns 32c + 16i + j and 32c + 16i + j + 8.

Tensors: (KS warps along K, RT row tiles a warp, 16 rows, 8) with each thread holding a 2 x 2
block (rows 2g, 2g + 1; columns 2t, 2t + 1): our row 2g is the mma's row g, 2g + 1 its row g + 8,
and the two columns are the fragment's two halves (k slots 2t.. and 2t + 8.., or two bit planes,
or two codebook words), handed to the PTX through ``inline_asm_elementwise(pack=4)`` like
``triton_bmma``. Widths 1..4; wider blocks run on ``triton_lut``'s kernels. CUDA only (Gluon,
sm_80+); fp16 codebooks, fp16 x, or bf16 x divided per row by a power of two (``row_scales``: its
range does not fit fp16, its mantissa does) and the sums multiplied back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

try:  # Gluon: explicit layouts (Triton >= 3.5)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except Exception:  # pragma: no cover - older Triton: the other kernels serve every width
    gluon = None

from anybit.kernels.tiling import KTILE, tile_shape

MAX_BITS = 4  # widths decoded here (codebooks of up to 16 entries in 8 registers)
MAX_BATCH = 16  # rows of x: two n-tiles of 8
STEP_CHUNKS = 4 if gluon is None else gl.constexpr(4)  # chunks of 32 columns per K step: one per thread column t of a fragment
TILE_CHUNKS = KTILE if gluon is None else gl.constexpr(KTILE)  # chunks per mma tile of the tiled order


def available() -> bool:
    return gluon is not None


def supports(x2: torch.Tensor, luts) -> bool:
    """Whether a call can run here: fp16 or bf16 x of up to 16 rows on CUDA, fp16 codebooks."""
    return (gluon is not None and x2.is_cuda and x2.dtype in (torch.float16, torch.bfloat16)
            and 0 < x2.shape[0] <= MAX_BATCH and all(lut.dtype == torch.float16 for lut in luts))


def row_scales(x2: torch.Tensor) -> torch.Tensor:
    """fp32 (M,): a power of two per row of x with ``max|x[m]| / scale[m] <= 2**14``, so that a bf16
    row divided by it fits fp16 with every bf16 mantissa bit (down to 2**-28 of its largest value);
    the kernel multiplies its sums by it. On the device, without a host synchronisation."""
    _, exponent = torch.frexp(x2.float().abs().amax(1))  # max|x| < 2**exponent
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent - 14)


def x_fragments(x2: torch.Tensor, input_scale: torch.Tensor | None = None,
                scales: torch.Tensor | None = None) -> torch.Tensor:
    """int32 (chunks padded to whole steps, 8, M, 2): word [c, j, m, i] holds the fp16 pair
    (x[m, 32c + 16i + j], x[m, 32c + 16i + j + 8]) (divided by ``input_scale`` per column and by
    ``scales`` per row when given, then rounded to fp16), zeros past in_features. The rows of x are
    innermost so that a warp's load of one mma's B fragments (8 rows x 4 chunks) touches few sectors."""
    M, K = x2.shape
    xs = x2 if input_scale is None else (x2.float() / input_scale.float())
    if scales is not None:
        xs = xs.float() / scales[:, None]
    xs = xs.to(torch.float16)
    padded = -(-K // (32 * STEP_CHUNKS)) * 32 * STEP_CHUNKS
    if padded != K:
        xs = F.pad(xs, (0, padded - K))
    # column 32c + 16i + 8e + j of row m -> [c, j, m, i, e]; the pair e = 0, 1 is one int32
    frag = xs.reshape(M, padded // 32, 2, 2, 8).permute(1, 4, 0, 2, 3).contiguous()
    return frag.view(torch.int32).view(padded // 32, 8, M, 2)


def fragment_asm(bits: int, s: int, ntiles: int) -> str:
    """PTX for one k16 step of one 16-row tile: decode the A fragment of column offset ``s``
    (columns s, s + 8, s + 16, s + 24 of the thread's chunk) for rows g and g + 8, then one mma
    per n-tile of x. Operands (4 registers each, ``pack=4``, elements (2g, 2t), (2g, 2t + 1),
    (2g + 1, 2t), (2g + 1, 2t + 1)): outputs acc per n-tile, then planes 0/1, planes 2/3, the
    codebook words 0/1, 2/3, 4/5, 6/7 (entries two a word), x's B fragments (n-tile 0: b0, b1;
    n-tile 1: b0, b1), acc per n-tile."""
    def shift(dst, src, n):  # logical shift right by n (left when negative)
        return f"shr.b32 {dst}, {src}, {n};" if n > 0 else f"shl.b32 {dst}, {src}, {-n};" if n < 0 else \
            f"mov.b32 {dst}, {src};"

    o = 4 * ntiles
    p01, p23, lw, xb, acc = o, o + 4, o + 8, o + 24, o + 28

    def plane(row, p):  # register of bit plane p of row (0: mma row g, 1: g + 8)
        return f"${(p01 if p < 2 else p23) + 2 * row + p % 2}"

    def word(row, w):  # codebook word w (entries 2w, 2w + 1) of row
        return f"${lw + 4 * (w // 2) + 2 * row + w % 2}"

    lines = ["{", ".reg .b32 u, v, sel, hb, hc, l0, l1, l2, l3, q0, q1, a0, a1, a2, a3;"]
    for row in (0, 1):
        # byte k of t: bits 0, 1 of the code of column 8k + s; of hb / hc: its bit 2 / 3 as 4
        lines += [shift("u", plane(row, 0), s), "and.b32 u, u, 0x01010101;"]
        if bits > 1:
            lines += [shift("v", plane(row, 1), s - 1), "and.b32 v, v, 0x02020202;", "or.b32 u, u, v;"]
        # selectors: PRMT picks a half2 of two codes' entries among 4 (2 words) by bits 0, 1
        lines.append("mad.lo.u32 sel, u, 0x22, 0x10101010;")
        if bits > 2:
            lines += [shift("hb", plane(row, 2), s - 2), "and.b32 hb, hb, 0x04040404;",
                      "mad.lo.u32 hb, hb, 0x11, 0x32103210;"]
        if bits > 3:
            lines += [shift("hc", plane(row, 3), s - 2), "and.b32 hc, hc, 0x04040404;",
                      "mad.lo.u32 hc, hc, 0x11, 0x32103210;"]
        for half in (0, 1):  # codes of bytes 0, 1 (columns s, s + 8), then 2, 3 (s + 16, s + 24)
            if half:
                lines += ["shr.b32 sel, sel, 16;"] + (["shr.b32 hb, hb, 16;"] if bits > 2 else []) + (
                    ["shr.b32 hc, hc, 16;"] if bits > 3 else [])
            out = f"a{2 * half + row}"  # a0: (g, 2t..), a1: (g + 8, 2t..), a2: (g, 2t + 8..), a3: (g + 8, 2t + 8..)
            if bits <= 2:
                lines.append(f"prmt.b32 {out}, {word(row, 0)}, {word(row, 1)}, sel;")
            elif bits == 3:
                lines += [f"prmt.b32 l0, {word(row, 0)}, {word(row, 1)}, sel;",
                          f"prmt.b32 l1, {word(row, 2)}, {word(row, 3)}, sel;",
                          f"prmt.b32 {out}, l0, l1, hb;"]
            else:
                lines += [f"prmt.b32 l0, {word(row, 0)}, {word(row, 1)}, sel;",
                          f"prmt.b32 l1, {word(row, 2)}, {word(row, 3)}, sel;",
                          f"prmt.b32 l2, {word(row, 4)}, {word(row, 5)}, sel;",
                          f"prmt.b32 l3, {word(row, 6)}, {word(row, 7)}, sel;",
                          "prmt.b32 q0, l0, l1, hb;", "prmt.b32 q1, l2, l3, hb;",
                          f"prmt.b32 {out}, q0, q1, hc;"]
    for n in range(ntiles):
        d = ",".join(f"${4 * n + k}" for k in range(4))
        c = ",".join(f"${acc + 4 * n + k}" for k in range(4))
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{d}}}, {{a0,a1,a2,a3}}, "
                     f"{{${xb + 2 * n},${xb + 2 * n + 1}}}, {{{c}}};")
    return "\n".join(lines + ["}"])


def fragment_constraints(ntiles: int) -> str:
    return ",".join(["=f"] * (4 * ntiles) + ["r"] * 28 + ["f"] * (4 * ntiles))


if gluon is not None:  # callable from host code too; in a kernel they make constexpr strings
    fragment_asm = gluon.constexpr_function(fragment_asm)
    fragment_constraints = gluon.constexpr_function(fragment_constraints)

    @gluon.jit
    def _load_codes(crow, chunk, mask01, mask23, NCHUNK, BITS: gl.constexpr, TILED: gl.constexpr):
        """Plane words 0/1 and 2/3 of the step starting at ``chunk`` (zeros past the matrix). ``crow``
        points at plane 0/1 (by column) of chunk 0 of each row, in the stored or the tiled order."""
        inside = chunk < NCHUNK
        if TILED:  # (mma tile, plane, 16 x 8 words) per 16-row tile: planes 128 words apart
            at = crow + (chunk // TILE_CHUNKS) * (BITS * 128) + 2 * (chunk % TILE_CHUNKS)
            far = 256
        else:  # row-major, a chunk's planes side by side
            at = crow + chunk * BITS
            far = 2
        c01 = gl.load(at, mask=mask01 & inside, other=0)
        if BITS > 2:
            c23 = gl.load(at + far, mask=mask23 & inside, other=0)
        else:
            c23 = gl.zeros_like(c01)
        return c01, c23

    @gluon.jit
    def _step(c01, c23, l0, l1, l2, l3, xj, acc0, acc1, J: gl.constexpr, BITS: gl.constexpr, NT: gl.constexpr):
        """Decode column offset J of the step's chunks and multiply by x (one mma per n-tile)."""
        if NT == 1:
            acc0 = gl.inline_asm_elementwise(fragment_asm(BITS, J, 1), fragment_constraints(1),
                                             [c01, c23, l0, l1, l2, l3, xj, acc0], dtype=gl.float32, is_pure=True,
                                             pack=4)
        else:
            acc0, acc1 = gl.inline_asm_elementwise(fragment_asm(BITS, J, 2), fragment_constraints(2),
                                                   [c01, c23, l0, l1, l2, l3, xj, acc0, acc1],
                                                   dtype=(gl.float32, gl.float32), is_pure=True, pack=4)
        return acc0, acc1

    @gluon.jit
    def _mma_rows(tile, xf_ptr, codes_ptr, lut_ptr, ridx_ptr, y_ptr, M, R, NCHUNK, NSTEP, stride_xc, stride_xj, stride_cr,
                  stride_lr, stride_ym, xs_ptr, BITS: gl.constexpr, KS: gl.constexpr, RT: gl.constexpr,
                  NT: gl.constexpr, HAS_RIDX: gl.constexpr, TILED: gl.constexpr, HAS_XS: gl.constexpr):
        """Rows [tile * 16 * RT, +16 * RT) of one width block against every row of x. ``lut_ptr``:
        the fp16 codebooks as int32 words (two entries each), ``stride_lr`` in words. Codes in the
        stored order (``stride_cr`` words a row) or, ``TILED``, in ``tiling.tile_codes``' order
        (``stride_cr`` words a 16-row tile, NCHUNK a whole number of mma tiles). ``HAS_XS``: x was
        divided by ``xs_ptr[m]`` per row (``row_scales``) and the sums are multiplied back."""
        L4: gl.constexpr = gl.BlockedLayout([1, 1, 2, 2], [1, 1, 8, 4], [KS, 1, 1, 1], [3, 2, 1, 0])
        ks = gl.arange(0, KS, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))[:, None, None, None]
        rt = gl.arange(0, RT, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))[None, :, None, None]
        r = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4))))[None, None, :, None]
        col = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))[None, None, None, :]
        rows = tile * (16 * RT) + rt * 16 + r  # (1, RT, 16, 1)
        rmask = rows < R
        rows_c = gl.where(rmask, rows, 0).to(gl.int64)
        half = col % 2
        # codebook words: column pair (2t, 2t + 1) of word tensor q holds words 2q, 2q + 1 of the row
        lrow = lut_ptr + rows_c * stride_lr + half
        nwords: gl.constexpr = 2 ** BITS // 2 if BITS > 1 else 1
        l0 = gl.load(lrow, mask=rmask & (half < nwords), other=0)
        l1 = gl.zeros_like(l0)
        l2 = gl.zeros_like(l0)
        l3 = gl.zeros_like(l0)
        if BITS > 2:
            l1 = gl.load(lrow + 2, mask=rmask, other=0)
        if BITS > 3:
            l2 = gl.load(lrow + 4, mask=rmask, other=0)
            l3 = gl.load(lrow + 6, mask=rmask, other=0)
        # plane words: column (2t + i) holds plane i (i + 2 in the second tensor) of chunk c0 + t
        chunk = ks * STEP_CHUNKS + col // 2  # (KS, 1, 1, 8), the first step of each warp along K
        if TILED:  # word (r, c) of a tile's plane at 16 * (r // 2) + 2 * c + r % 2 (``tiling``)
            crow = codes_ptr + (tile * RT + rt).to(gl.int64) * stride_cr + (r // 2) * 16 + r % 2 + half * 128
        else:
            crow = codes_ptr + rows_c * stride_cr + half
        cmask = rmask & (half < BITS)  # planes 0/1; planes 2/3 below
        cmask23 = rmask & (half + 2 < BITS)
        # x fragments: row 2g + h of a (16, 8) tile is x row 8h + g (n-tile h), column 2t + i its b_i
        m = (r % 2) * 8 + r // 2  # (1, 1, 16, 1)
        xrow = xf_ptr + m * 2 + half
        xmask = m < M
        if NT == 1:  # rows 2g + 1 (x rows 8 + g) are not read: their words stay constant zeros
            xmask = xmask & (r % 2 == 0)
        ncp = NSTEP * STEP_CHUNKS
        acc0 = gl.zeros([KS, RT, 16, 8], gl.float32, L4)
        acc1 = gl.zeros([KS, RT, 16, 8], gl.float32, L4)
        c01, c23 = _load_codes(crow, chunk, cmask, cmask23, NCHUNK, BITS, TILED)
        for it in range(0, gl.cdiv(NSTEP, KS)):
            # the next step's plane words load while this one is decoded (loading x earlier, or two
            # steps ahead, measured no faster: H100, KERNEL_NOTES)
            nxt = chunk + KS * STEP_CHUNKS
            n01, n23 = _load_codes(crow, nxt, cmask, cmask23, NCHUNK, BITS, TILED)
            xc = xrow + chunk * stride_xc
            xm = xmask & (chunk < ncp)
            for j in gl.static_range(8):
                xj = gl.load(xc + j * stride_xj, mask=xm, other=0)
                acc0, acc1 = _step(c01, c23, l0, l1, l2, l3, xj, acc0, acc1, j, BITS, NT)
            c01 = n01
            c23 = n23
            chunk = nxt
        # accumulator (r, c) of n-tile h: row r of the tile against x row 8h + c
        y0 = gl.sum(acc0, axis=0)  # (RT, 16, 8): warps along K meet in shared memory
        L3: gl.constexpr = gl.SliceLayout(0, L4)
        rows3 = tile * (16 * RT) + gl.arange(0, RT, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))[:, None, None] * 16 \
            + gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))[None, :, None]
        n3 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))[None, None, :]
        rm3 = rows3 < R
        if HAS_RIDX:
            dst = gl.load(ridx_ptr + rows3, mask=rm3, other=0)
        else:
            dst = rows3
        if HAS_XS:
            y0 = y0 * gl.load(xs_ptr + n3, mask=n3 < M, other=1.0)
        gl.store(y_ptr + n3.to(gl.int64) * stride_ym + dst, y0.to(y_ptr.dtype.element_ty), mask=rm3 & (n3 < M))
        if NT == 2:
            y1 = gl.sum(acc1, axis=0)
            if HAS_XS:
                y1 = y1 * gl.load(xs_ptr + n3 + 8, mask=n3 + 8 < M, other=1.0)
            gl.store(y_ptr + (n3 + 8).to(gl.int64) * stride_ym + dst, y1.to(y_ptr.dtype.element_ty),
                     mask=rm3 & (n3 + 8 < M))

    @gluon.jit
    def _mma_kernel(xf_ptr, xs_ptr, y_ptr, M, NSTEP, stride_xc, stride_xj, stride_ym,
                    codes_a, lut_a, ridx_a, rows_a, nchunk_a, stride_ca, stride_la, tiles_a,
                    codes_b, lut_b, ridx_b, rows_b, nchunk_b, stride_cb, stride_lb,
                    BITS_A: gl.constexpr, RIDX_A: gl.constexpr, TILED_A: gl.constexpr, BITS_B: gl.constexpr,
                    RIDX_B: gl.constexpr, TILED_B: gl.constexpr, KS: gl.constexpr, RT: gl.constexpr, NT: gl.constexpr,
                    HAS_XS: gl.constexpr):
        """Program ``tile``: one tile of 16 * RT rows of block a (tiles [0, tiles_a)) or of block b
        (the rest; BITS_B = 0: no block b), so that a mixed-width matrix is one launch."""
        tile = gl.program_id(0)
        if BITS_B == 0:
            _mma_rows(tile, xf_ptr, codes_a, lut_a, ridx_a, y_ptr, M, rows_a, nchunk_a, NSTEP, stride_xc, stride_xj,
                      stride_ca, stride_la, stride_ym, xs_ptr, BITS_A, KS, RT, NT, RIDX_A, TILED_A, HAS_XS)
        elif tile < tiles_a:
            _mma_rows(tile, xf_ptr, codes_a, lut_a, ridx_a, y_ptr, M, rows_a, nchunk_a, NSTEP, stride_xc, stride_xj,
                      stride_ca, stride_la, stride_ym, xs_ptr, BITS_A, KS, RT, NT, RIDX_A, TILED_A, HAS_XS)
        else:
            _mma_rows(tile - tiles_a, xf_ptr, codes_b, lut_b, ridx_b, y_ptr, M, rows_b, nchunk_b, NSTEP, stride_xc,
                      stride_xj, stride_cb, stride_lb, stride_ym, xs_ptr, BITS_B, KS, RT, NT, RIDX_B, TILED_B, HAS_XS)


def config_for(blocks, nstep: int, batch: int) -> tuple[int, int]:
    """(KS warps along K, RT row tiles a warp) for the blocks (bits, rows) of one launch (H100
    sweeps, benchmarks/KERNEL_NOTES.md v11). "Short" matrices (up to ~4096 rows: 8 warps along K
    still make at most ~2048 warps, each with >= 4 steps) take 8 warps along K, others 4. Up to 8
    rows of x, and for mixed-width short launches: one row tile a warp. 9..16 rows (two mma per
    fragment): two row tiles a warp share the x loads, warps along K doubling up to ~2048 warps."""
    tiles = sum(-(-rows // 16) for _, rows in blocks)
    short = tiles * 8 <= 2048 and nstep >= 32
    if batch <= 8 or (short and len(blocks) > 1):
        return (8 if short else 4), 1
    warps = sum(-(-rows // 32) for _, rows in blocks)
    ks = 1
    while ks < 8 and warps * ks * 2 <= 2048 and nstep >= 4 * ks:
        ks *= 2
    return ks, 2


def launch(x2, blocks, in_features, y2, input_scale=None, *, config=None):
    """Write every width block ``(codes, lut, bits, row_index[, prepared])`` (bits <= 4, fp16
    codebooks) of one matrix into y2 (M, out) from x2 (M <= 16, in); return y2. Codes are read in
    the tiled order when the block carries ``triton_bmma.prepare_block``'s operands (its codes may
    then be None), else in the stored order. Blocks go two to a launch, widest first. ``config``:
    (KS, RT) instead of ``config_for``."""
    M = x2.shape[0]
    blocks = sorted((b for b in blocks if b[1].shape[0] > 0), key=lambda b: -b[2])
    if M == 0 or not blocks:
        return y2
    xs = x2 if input_scale is None else x2.float() / input_scale.float()
    # bf16 x: its range does not fit fp16, its 8 mantissa bits do once each row is scaled by a power of two
    scales = row_scales(xs) if x2.dtype != torch.float16 else None
    xf = x_fragments(xs, scales=scales)
    nstep = xf.shape[0] // STEP_CHUNKS
    nchunk = -(-in_features // 32)
    for i in range(0, len(blocks), 2):
        pair = blocks[i:i + 2]
        ks, rt = config or config_for([(b[2], b[1].shape[0]) for b in pair], nstep, M)
        args, consts = [], {}
        tiles = 0
        for name, block in zip("AB", pair):
            codes, lut, bits, row_index = block[:4]
            rows = lut.shape[0]
            tiled = block[4][1] if len(block) > 4 and block[4] is not None else None
            if tiled is not None:  # ``tiling.tile_codes``: whole mma tiles, a stride per 16-row tile
                _, kt = tile_shape(rows, nchunk)
                codes, stride, chunks = tiled, kt * bits * 128, kt * KTILE
            else:
                codes = codes.contiguous()
                stride, chunks = codes.stride(0), nchunk
            lut = lut.contiguous()
            if lut.shape[1] % 2 or lut.data_ptr() % 4:  # whole int32 words per row
                lut = F.pad(lut, (0, lut.shape[1] % 2))
            words = lut.view(torch.int32)
            args += [codes, words, row_index.contiguous() if row_index is not None else codes, rows, chunks, stride,
                     words.stride(0)]
            if name == "A":
                args.append(triton.cdiv(rows, 16 * rt))
            tiles += triton.cdiv(rows, 16 * rt)
            consts.update({f"BITS_{name}": bits, f"RIDX_{name}": row_index is not None,
                           f"TILED_{name}": tiled is not None})
        if len(pair) == 1:
            args += [xf, xf, xf, 0, 0, 0, 0]
            consts.update(BITS_B=0, RIDX_B=False, TILED_B=False)
        _mma_kernel[(tiles,)](xf, scales if scales is not None else xf, y2, M, nstep, xf.stride(0), xf.stride(1),
                              y2.stride(0), *args, **consts, KS=ks, RT=rt, NT=1 if M <= 8 else 2,
                              HAS_XS=scales is not None, num_warps=ks)
    return y2
