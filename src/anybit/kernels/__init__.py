"""LUT linear kernels: ``y = x @ W^T`` for per-row codebook weights with bit-plane packed codes.

Public entry points:

- ``lut_linear(x, codes, lut, bits, in_features, row_index=None, out=None, *, input_scale=None,
  outliers=None, out_features=None)``: one width block. ``codes`` int32 (rows_b, ceil(in/32) * bits)
  from ``anybit.formats.bitpack.pack_bitplanes``; ``lut`` (rows_b, >= 2**bits) fp16 (fp32
  holding fp16 values also works, slower); row r of the block is written to column
  ``row_index[r]`` of ``out`` (other columns untouched); without ``out``/``row_index`` the result
  is (..., rows_b). ``input_scale`` divides x per input column; ``outliers`` (sparse CSR
  (out_features x in_features), or a (crow, col, values) tuple) adds ``x @ S^T`` on the raw x
  once the block is written -- pass it with one block only.
- ``lut_linear_blocks(x, blocks, out_features, *, input_scale=None, outliers=None, out=None)``:
  a mixed-width matrix as its width blocks ``(codes, lut, bits, row_index)`` (a fifth element,
  ``triton_bmma.prepare_block``'s operands: subset coefficients and the codes in the tiled order
  of ``tiling``, is passed on to ``launch_blocks``; with it the codes may be None), all writing
  straight into one output: at batch 1 one launch for up to two blocks, one more for the outliers.
- ``grid_linear(x2, blocks, y2, *, inv_input_scale=None, outliers=None)``: the grids without a codebook
  per row (``triton_grid``: affine grids per row and group, codebooks per column), CUDA only; x in its
  original column order. ``grid_mode(grid, lut_axis, group_size, x)`` says whether it serves a linear's call.
- ``plan_linear_blocks(blocks, in_features, batch, dtype, device, *, input_scale=None, outliers=None)``:
  the same call for a caller that repeats it (``AnybitLinear`` at decoding's batch sizes), its launch
  decisions made once and its launches run straight through their compiled kernels (``launcher``).

On CUDA tensors these run the Triton kernels (``triton_lut``); elsewhere, or with
``ANYBIT_KERNELS=reference`` in the environment, the pure-torch reference (``reference``), which
is the same function. Where ``tiled_codes_supported``, ``AnybitLinear`` keeps the codes of its
blocks of up to 4 bits in the tiled order only (one copy), which the tensor-core kernels read.
Activations fp16, bf16 or fp32; accumulation in fp32. For batch-1
decoding capture the model in a CUDA graph, as the benchmarks do (benchmarks/kernel_speed.py,
benchmarks/decode.py): launched from Python, even planned, a call costs more host time than its
kernels take (benchmarks/call_overhead.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

from anybit.kernels.reference import (
    add_outliers_ref,
    check_block,
    csr_parts,
    lut_linear_ref,
    output_for,
)
from anybit.kernels.tiling import KTILE, stored_codes, tile_shape

__all__ = ["grid_linear", "grid_mode", "lut_linear", "lut_linear_blocks", "lut_linear_ref", "plan_linear_blocks", "triton_available", "use_triton"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_runs_on(device: torch.device) -> bool:
    return (device.type == "cuda" and os.environ.get("ANYBIT_KERNELS", "").lower() != "reference"
            and triton_available())


def use_triton(x: torch.Tensor) -> bool:
    """Whether ``lut_linear`` runs the Triton kernels for an input on ``x``'s device."""
    return triton_runs_on(x.device)


def tiled_codes_supported(device) -> bool:
    """Whether the tensor-core kernels run for inputs on ``device`` (Triton with Gluon, a GPU of
    compute capability 8.0 or newer): then blocks of up to 4 bits are best kept as
    ``triton_bmma.prepare_block``'s operands alone (binary tensor cores for 1-2 rows of x, the
    fragment kernel for 3-16 rows of fp16 or bf16 x; the other kernels untile them per call)."""
    device = torch.device(device)
    if not triton_runs_on(device):
        return False
    from anybit.kernels import triton_bmma

    return triton_bmma.available() and torch.cuda.get_device_capability(device) >= (8, 0)


def _triton():
    from anybit.kernels import triton_lut

    return triton_lut


def _prepare(x, in_features, out, row_index, rows, out_features):
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, expected {in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    y2 = output_for(x2, rows, row_index, out, out_features, lead)
    if y2.stride(-1) != 1:
        raise ValueError("out must be contiguous in its last dimension")
    return lead, x2, y2


def lut_linear(x: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor, bits: int, in_features: int,
               row_index: torch.Tensor | None = None, out: torch.Tensor | None = None, *,
               input_scale: torch.Tensor | None = None, outliers=None,
               out_features: int | None = None) -> torch.Tensor:
    """y[..., row_index[r]] = sum_k x[..., k] / input_scale[k] * lut[r, code[r, k]] (+ x @ S^T)."""
    bits = int(bits)
    if not use_triton(x):
        return lut_linear_ref(x, codes, lut, bits, in_features, row_index, out,
                              input_scale=input_scale, outliers=outliers, out_features=out_features)
    check_block(codes, lut, bits, in_features)
    lead, x2, y2 = _prepare(x, in_features, out, row_index, codes.shape[0], out_features)
    tk = _triton()
    tk.launch_block(x2, codes, lut, bits, in_features, y2, row_index, input_scale)
    if outliers is not None:
        tk.launch_outliers(x2, *csr_parts(outliers), y2)
    return y2.view(*lead, y2.shape[-1])


def _check_kernel_block(block, in_features: int) -> None:
    codes, lut, bits = block[:3]
    if codes is not None:
        check_block(codes, lut, int(bits), in_features)
        return
    prepared = block[4] if len(block) > 4 else None
    row_tiles, kt = tile_shape(lut.shape[0], -(-in_features // 32))
    if prepared is None or prepared[1].numel() != row_tiles * 16 * kt * KTILE * int(bits):
        raise ValueError("a block without codes needs its tiled codes (triton_bmma.prepare_block) for "
                         f"{lut.shape[0]} rows x {in_features} columns at {int(bits)} bits")


def _kernel_blocks(blocks, in_features: int) -> list[tuple]:
    """The blocks as the Triton launchers take them (integer bits), each checked (``_check_kernel_block``)."""
    blocks = [(b[0], b[1], int(b[2]), *b[3:]) for b in blocks]
    for block in blocks:
        _check_kernel_block(block, in_features)
    return blocks


def lut_linear_blocks(x: torch.Tensor, blocks: Iterable[Sequence], out_features: int, *,
                      input_scale: torch.Tensor | None = None, outliers=None,
                      out: torch.Tensor | None = None, planes=None) -> torch.Tensor:
    """A mixed-width matrix: ``blocks`` of (codes, lut, bits, row_index) covering every output row.
    ``planes``: ``xplanes.x_planes`` of x (with ``input_scale``) when the op that made x wrote them too;
    the binary tensor-core kernel then needs no launch of its own for them (ignored by the others)."""
    in_features = x.shape[-1]
    blocks = list(blocks)
    if out is None:
        out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    if use_triton(x):
        lead, x2, y2 = _prepare(x, in_features, out, 0, 0, out_features)
        tk = _triton()
        tk.launch_blocks(x2, _kernel_blocks(blocks, in_features), in_features, y2, input_scale, planes=planes)
        if outliers is not None:
            tk.launch_outliers(x2, *csr_parts(outliers), y2)
        return out
    for block in blocks:
        codes, lut, bits, row_index = stored_codes(block, in_features), *block[1:4]
        lut_linear_ref(x, codes, lut, int(bits), in_features, row_index, out, input_scale=input_scale)
    if outliers is not None:
        add_outliers_ref(x.reshape(-1, in_features), outliers, out.view(-1, out_features))
    return out


def grid_kernels_on() -> bool:
    """Whether ``triton_grid`` serves affine and per-column-codebook calls on CUDA: for now on request
    (``ANYBIT_GRID_KERNELS=1``). Its kernels are checked against the dense product under Triton's
    interpreter and compile for sm_90, but no GPU has run them yet (benchmarks/KERNEL_NOTES.md,
    twenty-second session); until one has, those layouts keep the pure-torch path by default."""
    return os.environ.get("ANYBIT_GRID_KERNELS", "") == "1"


def grid_mode(grid: str, lut_axis: int, group_size: int, x: torch.Tensor) -> int | None:
    """``triton_grid``'s mode for a linear of this grid called with ``x`` (None: no kernel serves it --
    per-row codebooks have their own, a CPU or the reference path decodes the weight, the grid kernels
    are off (``grid_kernels_on``), an affine group whose columns are not a multiple of 32, more rows of x
    than ``triton_grid.MAX_BATCH``)."""
    if (grid == "lut" and lut_axis == 0) or not grid_kernels_on() or not use_triton(x):
        return None
    from anybit.kernels import triton_grid

    mode = triton_grid.COLUMNS if grid == "lut" else triton_grid.AFFINE
    rows = x.numel() // max(1, x.shape[-1])
    if rows > triton_grid.MAX_BATCH or not triton_grid.supports(mode, group_size):
        return None
    return mode


def grid_linear(x2: torch.Tensor, blocks, y2: torch.Tensor, *,
                inv_input_scale: torch.Tensor | None = None, outliers=None) -> torch.Tensor:
    """y2 = x2 * inv_input_scale @ W^T (+ x2 @ S^T) for an affine or per-column-codebook W given as its width
    blocks (``triton_grid.GridBlock``), x2 in its original column order (``grid_mode`` says when);
    ``inv_input_scale``: fp32 reciprocals of the input scale."""
    from anybit.kernels import triton_grid

    triton_grid.launch(x2, blocks, y2, inv_input_scale)
    if outliers is not None:
        _triton().launch_outliers(x2, *csr_parts(outliers), y2)
    return y2


def plan_linear_blocks(blocks: Iterable[Sequence], in_features: int, batch: int, dtype: torch.dtype, device, *,
                       input_scale: torch.Tensor | None = None, outliers=None):
    """``lut_linear_blocks`` of these blocks for ``batch`` rows of ``dtype`` x on ``device``, its launch
    decisions made once, for a caller that makes the same call again and again (``AnybitLinear``, while
    its weights stay): a function ``(x2, y2, planes=None)`` that writes y2 (batch, out_features) from
    x2 (batch, in_features) as ``lut_linear_blocks`` would, its binary tensor-core launches run straight
    through their compiled kernels (``triton_bmma.BmmaLaunch``: ~14-31 us of host time less a launch).
    None where that is not the kernel ``lut_linear_blocks`` would run (other batches, wider blocks, no
    tiled codes, the reference path): call ``lut_linear_blocks`` then."""
    device = torch.device(device)
    if not tiled_codes_supported(device) or batch < 1:
        return None
    from anybit.kernels import triton_bmma

    tk = _triton()
    blocks = _kernel_blocks(blocks, in_features)
    x_like = torch.empty(batch, in_features, dtype=dtype, device=device)
    if tk.tensor_core_mode(x_like, blocks) != "bmma" or any(b[2] > triton_bmma.MAX_BITS for b in blocks):
        return None
    scale = input_scale.contiguous() if input_scale is not None else None
    bmma = triton_bmma.BmmaLaunch(blocks, in_features, batch, device, scale)
    sparse = csr_parts(outliers) if outliers is not None else None

    def run(x2: torch.Tensor, y2: torch.Tensor, planes=None) -> None:
        bmma(x2, y2, planes)
        if sparse is not None:
            tk.launch_outliers(x2, *sparse, y2)

    return run
