"""The tiled order of a width block's codes: the one copy of the codes that ``AnybitLinear`` keeps on
a GPU with the tensor-core kernels (``triton_bmma`` reads nothing else, ``triton_mma`` reads it as
well as the stored order).

The stored order (``anybit.formats.bitpack``) is row-major: row r's words for chunk c (32 columns)
and bit plane p at ``[r, c * bits + p]``. The tiled order is flat int32 over (16-row tile, mma tile
of 8 chunks, plane, 16 rows x 8 chunks in mma fragment order), rows padded to 64 and chunks to 8
with zeros. Fragment order: lane ``4g + t`` of a warp owns rows 2g, 2g + 1 at chunks 2t, 2t + 1, and
its four words are contiguous in the order the binary mma takes its A operand (a0..a3: (2g, 2t),
(2g + 1, 2t), (2g, 2t + 1), (2g + 1, 2t + 1)): a warp's words of one mma tile and plane are 512
contiguous bytes, one 16-byte load a lane, straight into the registers of the mma (no moves), lane
after lane. Word (r, c) of a tile sits at ``16 * (r // 2) + 2 * c + r % 2``. Pure torch: the GPU
kernels read it, the module converts both ways.
"""

from __future__ import annotations

import torch

KTILE = 8  # chunks of 32 columns per mma tile (256 columns)
ROW_ALIGN = 64  # rows padded to whole 64-row groups


def tile_shape(rows: int, nchunk: int) -> tuple[int, int]:
    """(16-row tiles, mma tiles a row tile) of the tiled order of a (rows, nchunk * bits) block."""
    return -(-rows // ROW_ALIGN) * ROW_ALIGN // 16, -(-nchunk // KTILE)


def tile_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The tiled order of stored codes (rows, nchunk * bits): word (r, c, p) goes to
    ``(((r // 16) * kt + c // 8) * bits + p) * 128 + 16 * ((r % 16) // 2) + 2 * (c % 8) + r % 2``."""
    rows, words = codes.shape
    nchunk = words // bits
    row_tiles, kt = tile_shape(rows, nchunk)
    t = torch.zeros(row_tiles * 16, kt * KTILE, bits, dtype=torch.int32, device=codes.device)
    t[:rows, :nchunk] = codes.view(rows, nchunk, bits)
    t = t.view(row_tiles, 8, 2, kt, KTILE, bits)  # row 2g + i of a tile: (g, i)
    return t.permute(0, 3, 5, 1, 4, 2).contiguous().view(-1)


def untile_codes(tiled: torch.Tensor, bits: int, rows: int, nchunk: int) -> torch.Tensor:
    """Inverse of ``tile_codes``: the stored codes (rows, nchunk * bits) of a tiled block."""
    row_tiles, kt = tile_shape(rows, nchunk)
    t = tiled.view(row_tiles, kt, bits, 8, KTILE, 2).permute(0, 3, 5, 1, 4, 2)
    t = t.reshape(row_tiles * 16, kt * KTILE, bits)[:rows, :nchunk]
    return t.reshape(rows, nchunk * bits).contiguous()


def stored_codes(block, in_features: int) -> torch.Tensor:
    """The stored-order codes of a kernel block ``(codes, lut, bits, row_index[, prepared])``: its
    own, or untiled from ``prepared`` (subset coefficients, tiled codes) when it carries only those."""
    codes, lut, bits = block[:3]
    if codes is not None:
        return codes
    return untile_codes(block[4][1], int(bits), lut.shape[0], -(-in_features // 32))
