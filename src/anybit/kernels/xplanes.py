"""x as bit planes, the binary tensor-core kernel's operand (``triton_bmma``), and the ops that make them.

A row of x becomes 24-bit fixed point ``x = s_m * X`` with ``s_m = 2**(e - 23)`` a power of two
(``max|x| < 2**e``, so values within 2**13 of the largest keep every fp16 mantissa bit) and
``X = sum_i w_i * bit_i(X)`` (two's complement: ``w_i = 2**i``, the sign plane ``-2**23``); plane
i of 32 columns is one int32 word. An mma tile (256 columns) takes 256 words, in the order the
kernel hands them to the mma as its B operand (``x_planes``).

Three producers, one portable Triton kernel (also under the interpreter):

- ``x_planes(x, input_scale)``: the planes of x itself (divided per column by the input scale):
  its own launch before the linear.
- ``add_rms_norm_planes(h, delta, weight, eps)`` and ``silu_mul_planes(gate, up)``: the glue a
  LLaMA block runs before its linears (residual add + RMSNorm; SwiGLU's SiLU-and-multiply), with
  the planes of their output written in the same launch, so that a decoder spends no launch on
  them (``AnybitLinear.forward(x, planes=...)``; a launch is ~2 us against ~10 us for a batch-1
  linear, benchmarks/KERNEL_NOTES.md).

Every program of a launch reads its row in full for the row's reductions (sum of squares, largest
|value|; the row is ~8-44 KB and stays in L2), then writes the values and planes of its own chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from anybit.kernels.launcher import KernelLaunch
from anybit.kernels.tiling import KTILE

PLANES = 24  # fixed-point bits of x; 3 groups of 8 mma columns
XTILE_WORDS = 256  # x plane words an mma tile: 32 planes (24..31 repeat the sign, never read) x 8 chunks
MAX_KSPLIT = 8  # warps along K of a bmma program: planes are padded to a multiple of this many mma tiles
CHUNKS_PER_PROGRAM = 4
MODE_X, MODE_RMS_NORM, MODE_SILU_MUL = 0, 1, 2


def plane_chunks(in_features: int) -> int:
    """Chunks of 32 columns per plane of x, padded to a multiple of MAX_KSPLIT mma tiles (zeros past
    in_features), so that every warp along K of a program has a tile to read."""
    return -(-in_features // (32 * KTILE * MAX_KSPLIT)) * KTILE * MAX_KSPLIT


@triton.jit
def _load(a_row, b_row, w_ptr, cols, K, MODE: tl.constexpr, HAS_B: tl.constexpr):
    """The inputs of ``_value`` at ``cols`` as fp32 (0 past K; a missing input scale: 1)."""
    inside = cols < K
    a = tl.load(a_row + cols, mask=inside, other=0.0).to(tl.float32)
    b = a
    w = a
    if HAS_B:
        b = tl.load(b_row + cols, mask=inside, other=1.0 if MODE == 0 else 0.0).to(tl.float32)
    if MODE == 1:
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    return a, b, w


@triton.jit
def _residual(a, b, DT: tl.constexpr, HAS_B: tl.constexpr):
    """MODE_RMS_NORM's h = a + b, rounded to the row's dtype (a alone without a residual)."""
    if HAS_B:
        return (a + b).to(DT).to(tl.float32)
    return a


@triton.jit
def _value(a, b, w, inv_rms, DT: tl.constexpr, MODE: tl.constexpr, HAS_B: tl.constexpr):
    """The row's value from ``_load``'s inputs. MODE_X: a / b (b the input scale, HAS_B), unrounded.
    MODE_RMS_NORM: w * (h * inv_rms) with LlamaRMSNorm's roundings. MODE_SILU_MUL: silu(a) * b,
    rounded as two fp16 (bf16) ops are."""
    if MODE == 0:
        v = a
        if HAS_B:
            v = a / b
    elif MODE == 1:
        v = (w * (_residual(a, b, DT, HAS_B) * inv_rms).to(DT).to(tl.float32)).to(DT).to(tl.float32)
    else:
        v = ((a / (1.0 + tl.exp(-a))).to(DT).to(tl.float32) * b).to(DT).to(tl.float32)
    return v


@triton.jit
def _squares(a, b, DT: tl.constexpr, HAS_B: tl.constexpr):
    """Per-lane MODE_RMS_NORM h * h of ``_load``'s inputs."""
    h = _residual(a, b, DT, HAS_B)
    return h * h


@triton.jit
def _planes_kernel(a_ptr, b_ptr, w_ptr, h_ptr, y_ptr, xpl_ptr, xs_ptr, K, NCP, eps,
                   stride_am, stride_bm, stride_hm, stride_ym, stride_pm,
                   MODE: tl.constexpr, HAS_B: tl.constexpr, BLOCK_K: tl.constexpr, P1: tl.constexpr,
                   P2: tl.constexpr, LOOP: tl.constexpr, CB: tl.constexpr):
    """Row m, chunks [pid * CB, (pid + 1) * CB) of 32 columns: the row's values (``_value``) at
    those columns into y (and h, MODE_RMS_NORM with a residual) unless MODE_X, and their planes:
    bit i of ``X = round(v / s_m)`` at columns 32c..32c+31 in ``xpl[m, c // 8]``, at the word
    ``x_planes`` gives for plane i and chunk c % 8. For the row's reductions a row of up to three
    power-of-two pieces (BLOCK_K, P1, P2 columns; 0: none) is loaded once, with the program's own
    columns, before them (one round trip to L2, not one a pass); LOOP: longer rows, a loop over
    blocks of BLOCK_K."""
    m = tl.program_id(0)
    pid = tl.program_id(1)
    DT: tl.constexpr = a_ptr.dtype.element_ty
    a_row = a_ptr + m * stride_am
    b_row = b_ptr + m * stride_bm
    offs = tl.arange(0, BLOCK_K)
    ch = pid * CB + tl.arange(0, CB)
    lane = tl.arange(0, 32)
    cols = ch[:, None] * 32 + lane[None, :]
    own_a, own_b, own_w = _load(a_row, b_row, w_ptr, cols, K, MODE, HAS_B)
    inv_rms = 1.0
    if LOOP:
        if MODE == 1:
            ssq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ra, rb, rw = _load(a_row, b_row, w_ptr, k0 + offs, K, MODE, HAS_B)
                ssq += _squares(ra, rb, DT, HAS_B)
            inv_rms = 1.0 / tl.sqrt(tl.sum(ssq, axis=0) / K + eps)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ra, rb, rw = _load(a_row, b_row, w_ptr, k0 + offs, K, MODE, HAS_B)
            amax = tl.maximum(amax, tl.abs(_value(ra, rb, rw, inv_rms, DT, MODE, HAS_B)))
        a = tl.max(amax, axis=0)
    else:
        ra, rb, rw = _load(a_row, b_row, w_ptr, offs, K, MODE, HAS_B)
        if P1 > 0:
            ra1, rb1, rw1 = _load(a_row, b_row, w_ptr, BLOCK_K + tl.arange(0, P1), K, MODE, HAS_B)
        if P2 > 0:
            ra2, rb2, rw2 = _load(a_row, b_row, w_ptr, BLOCK_K + P1 + tl.arange(0, P2), K, MODE, HAS_B)
        if MODE == 1:  # LlamaRMSNorm: rsqrt(mean(h**2) + eps) in fp32
            ssq = tl.sum(_squares(ra, rb, DT, HAS_B), axis=0)
            if P1 > 0:
                ssq += tl.sum(_squares(ra1, rb1, DT, HAS_B), axis=0)
            if P2 > 0:
                ssq += tl.sum(_squares(ra2, rb2, DT, HAS_B), axis=0)
            inv_rms = 1.0 / tl.sqrt(ssq / K + eps)
        a = tl.max(tl.abs(_value(ra, rb, rw, inv_rms, DT, MODE, HAS_B)), axis=0)
        if P1 > 0:
            a = tl.maximum(a, tl.max(tl.abs(_value(ra1, rb1, rw1, inv_rms, DT, MODE, HAS_B)), axis=0))
        if P2 > 0:
            a = tl.maximum(a, tl.max(tl.abs(_value(ra2, rb2, rw2, inv_rms, DT, MODE, HAS_B)), axis=0))
    # e = floor(log2 a) + 1 from the fp32 exponent field (exact); a == 0 or tiny: e = -100
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
    e = tl.maximum(e, -100)
    up = ((150 - e) << 23).to(tl.float32, bitcast=True)  # 2**(23 - e)
    if pid == 0:
        tl.store(xs_ptr + m, ((104 + e) << 23).to(tl.float32, bitcast=True))  # 2**(e - 23)
    v = _value(own_a, own_b, own_w, inv_rms, DT, MODE, HAS_B)
    if MODE != 0:
        tl.store(y_ptr + m * stride_ym + cols, v.to(y_ptr.dtype.element_ty), mask=cols < K)
    if MODE == 1 and HAS_B:  # the residual sum (without a residual, h is the input itself)
        h = _residual(own_a, own_b, DT, HAS_B)
        tl.store(h_ptr + m * stride_hm + cols, h.to(h_ptr.dtype.element_ty), mask=cols < K)
    q = tl.floor(v * up + 0.5)
    q = tl.minimum(tl.maximum(q, -8388608.0), 8388607.0).to(tl.int32)
    plane = tl.arange(0, 32)
    bit = (q[None, :, :] >> plane[:, None, None]) & 1  # (32 planes, CB, 32 columns)
    words = tl.sum((bit << lane[None, None, :]).to(tl.uint32), axis=2)  # disjoint bits: sum = OR
    c = ch % 8
    poff = (plane // 16) * 128 + (plane % 8) * 16 + ((plane // 8) % 2) * 2
    dst = xpl_ptr + m * stride_pm + (ch // 8 * 256 + (c // 2) * 4 + c % 2)[None, :] + poff[:, None]
    tl.store(dst, words.to(tl.int32, bitcast=True), mask=ch[None, :] < NCP)


def row_blocks(K: int, mode: int) -> tuple[int, int, int, bool]:
    """(BLOCK_K, P1, P2, LOOP) of ``_planes_kernel`` for rows of K columns. Every program evaluates
    the whole row for its reductions, padded lanes included: MODE_SILU_MUL, where that is a SiLU a
    lane, splits the row into up to three power-of-two pieces (11008: 8192 + 2048 + 1024 lanes, not
    16384; 14336: 8192 + 4096 + 2048, exact), the other modes take one power-of-two block (a cross-warp
    reduction a piece costs them more than their idle lanes: H100, KERNEL_NOTES "Twelfth session").
    Rows over 16384 columns: a loop over blocks of 16384."""
    if K > 16384:
        return 16384, 0, 0, True
    if mode != MODE_SILU_MUL:
        return triton.next_power_of_2(K), 0, 0, False
    pieces, rest = [], K
    while rest > 0:
        p = 1 << (rest.bit_length() - 1)
        pieces.append(p if len(pieces) < 2 or p == rest else 2 * p)
        rest -= pieces[-1]
    return (*(pieces + [0, 0])[:3], False)


def program_warps(K: int, mode: int) -> int:
    """Warps of a ``_planes_kernel`` program for rows of K columns: 16 where a row's evaluation is long
    (SiLU at every K; plain planes above 8192 columns), else 8. H100 (``benchmarks/planes_launch.py``),
    us a call at 8 -> 16 warps: SiLU 2.99 -> 2.67 (K = 4096), 3.82 -> 2.95 (5120), 4.22 -> 4.21 (11008),
    5.02 -> 4.64 (14336); plain planes 2.83 -> 2.65 (11008), 2.94 -> 2.66 (14336) but 2.33 -> 2.40
    (4096); the norm 0.12-0.20 us slower with 16 at every K; 4 warps never more than 0.01 us faster than 8."""
    if mode == MODE_SILU_MUL or (mode == MODE_X and K > 8192):
        return 16
    return 8


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (M, K) with unit column stride (a view where it can be; t itself where it is one)."""
    if t.dim() == 2 and t.stride(-1) == 1:
        return t
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _plane_buffers(M: int, K: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(xpl, xs)`` for the planes of M rows of K columns."""
    xpl = torch.empty(M, plane_chunks(K) // KTILE, XTILE_WORDS, dtype=torch.int32, device=device)
    return xpl, torch.empty(M, dtype=torch.float32, device=device)


def _planes_call(mode: int, a2, b2, weight, eps: float, sum_out, y_out, xpl, xs, filler):
    """(grid, every argument of ``_planes_kernel`` in order, options) of a launch; ``filler`` stands in
    for the inputs and outputs ``mode`` has not (never read or written)."""
    M, K = a2.shape
    ncp = xpl.shape[1] * KTILE
    block_k, p1, p2, loop = row_blocks(K, mode)
    args = [a2, *(t if t is not None else filler for t in (b2, weight, sum_out, y_out)), xpl, xs, K, ncp, float(eps),
            a2.stride(0), b2.stride(0) if b2 is not None and b2.dim() == 2 else 0,
            sum_out.stride(0) if sum_out is not None else 0, y_out.stride(0) if y_out is not None else 0,
            xpl.stride(0), mode, b2 is not None, block_k, p1, p2, loop, CHUNKS_PER_PROGRAM]
    return (M, ncp // CHUNKS_PER_PROGRAM), args, {"num_warps": program_warps(K, mode)}


def _launch(mode: int, a2, b2=None, weight=None, eps: float = 0.0, sum_out=None, y_out=None):
    """Planes ``(xpl, xs)`` of the values ``_value`` makes from the rows of a2 (and b2, weight) in
    ``mode``; the values also into y_out, and MODE_RMS_NORM's residual sum into sum_out, when given."""
    xpl, xs = _plane_buffers(*a2.shape, a2.device)
    if a2.shape[0] == 0:
        return xpl, xs
    grid, args, options = _planes_call(mode, a2, b2, weight, eps, sum_out, y_out, xpl, xs, a2)
    _planes_kernel[grid](*args, **options)
    return xpl, xs


class XPlanesLaunch:
    """``x_planes`` of M rows of K columns (divided by ``input_scale`` when given), its launch worked out
    once (``launcher.KernelLaunch``: no pass through Triton's dispatch after the first call), for a
    caller that makes the planes of many x of one shape: ``XPlanesLaunch(M, K, device)(x2)``."""

    def __init__(self, M: int, K: int, device, input_scale: torch.Tensor | None = None):
        self.shape, self.device = (M, K), torch.device(device)
        scale = input_scale.contiguous() if input_scale is not None else None
        # what each call brings (x, the planes it writes) stands on the meta device until then; x also
        # fills the inputs MODE_X does not read, as in ``_launch``: the launch keeps no tensor of its own,
        # so it can be made while a CUDA graph's memory pool is current (a compiled step's first call)
        xpl, xs = _plane_buffers(M, K, "meta")
        x = torch.empty(M, K, dtype=torch.float16, device="meta")
        grid, args, options = _planes_call(MODE_X, x, scale, None, 0.0, None, None, xpl, xs, x)
        x_slots = ("a_ptr", *(["b_ptr"] if scale is None else []), "w_ptr", "h_ptr", "y_ptr")
        self.launch = KernelLaunch(_planes_kernel, grid, args, options, (x_slots, "xpl_ptr", "xs_ptr", "stride_am"))

    def __call__(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x2 = _rows(x2)
        if tuple(x2.shape) != self.shape:
            raise ValueError(f"planes of {tuple(x2.shape)} rows x columns, planned for {self.shape}")
        xpl, xs = _plane_buffers(*self.shape, self.device)
        if self.shape[0]:
            self.launch(x2, xpl, xs, x2.stride(0))
        return xpl, xs


def x_planes(x2: torch.Tensor, input_scale: torch.Tensor | None = None):
    """(planes int32 (M, mma tiles, XTILE_WORDS), scales fp32 (M,)) of x2 (M, K) (divided by
    ``input_scale`` per column when given): ``x2 / input_scale ~= scales[:, None] * X``. An mma
    tile's words are in the order the kernel hands them to the mma as its B operand, two 128-word
    halves (planes 0..15, 16..31) read like a plane of codes (``tiling``: lane ``4g + t``'s four
    words contiguous): plane i of chunk c (of 8) at ``128 * (i // 16) + 16 * (i % 8) + 4 * (c // 2)
    + 2 * ((i // 8) % 2) + c % 2`` -- so lane 4g + t holds planes g and 8 + g (16 + g) of chunks 2t,
    2t + 1, the B fragments of its three plane groups. ``plane_words`` reads them back."""
    scale = input_scale.contiguous() if input_scale is not None else None
    return _launch(MODE_X, _rows(x2), scale)


def add_rms_norm_planes(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """LlamaRMSNorm of the residual sum in one launch: ``(s, y, planes)`` with ``s = h + delta`` (h
    when delta is None) in h's dtype, ``y = weight * rms_norm(s)`` rounded as LlamaRMSNorm rounds
    (fp32 statistics, cast back, then the weight) and ``planes = x_planes(y)``, bit for bit."""
    h2 = _rows(h)
    y = torch.empty(h2.shape, dtype=h.dtype, device=h.device)
    if delta is None:
        return h, y.view(h.shape), _launch(MODE_RMS_NORM, h2, None, weight.contiguous(), eps, None, y)
    s = torch.empty(h2.shape, dtype=h.dtype, device=h.device)
    planes = _launch(MODE_RMS_NORM, h2, _rows(delta), weight.contiguous(), eps, s, y)
    return s.view(h.shape), y.view(h.shape), planes


def silu_mul_planes(gate: torch.Tensor, up: torch.Tensor):
    """SwiGLU's ``silu(gate) * up`` (two rounded ops, as in eager PyTorch) and ``x_planes`` of it, one
    launch: ``(y, planes)``."""
    g2, u2 = _rows(gate), _rows(up)
    y = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    planes = _launch(MODE_SILU_MUL, g2, u2, None, 0.0, None, y)
    return y.view(gate.shape), planes


def plane_words(xpl: torch.Tensor) -> torch.Tensor:
    """int32 (M, 24, chunks): ``x_planes``' words by plane and chunk of 32 columns."""
    M, ktp = xpl.shape[:2]
    w = xpl.view(M, ktp, 2, 8, 4, 2, 2)  # (tile, plane // 16, plane % 8, chunk // 2, (plane // 8) % 2, chunk % 2)
    return w.permute(0, 2, 5, 3, 1, 4, 6).reshape(M, 32, ktp * KTILE)[:, :PLANES]


def plane_weights(device) -> torch.Tensor:
    """fp64 (24,): the value of each plane bit, two's complement."""
    w = 2.0 ** torch.arange(PLANES, dtype=torch.float64, device=device)
    w[-1] = -w[-1]
    return w
