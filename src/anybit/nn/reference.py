"""Pure-torch math of one packed width block: the reference that GPU kernels replace.

Each ``*_matmul`` function multiplies activations by one block of bit-plane packed codes
(``formats/bitpack.py``) without keeping the decoded block. For CUDA inputs ``AnybitLinear``
calls ``anybit.kernels``' counterparts instead where they exist: ``lut_linear`` for
``lut_rows_matmul``, functions of the same name and signature for the others (see
``anybit.nn.linear.block_kernel``). Decoding runs in fp32, the product in ``x``'s dtype.
"""

from __future__ import annotations

import torch

from anybit.formats.bitpack import CHUNK, unpack_bitplanes


def decode_lut(words: torch.Tensor, lut: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """(units, length) fp32 values: unit u's code k decodes to ``lut[u, k]``."""
    codes = unpack_bitplanes(words, bits, length).long()
    return torch.gather(lut.float(), 1, codes)


def decode_affine(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                  columns: int) -> torch.Tensor:
    """(rows, columns) fp32 values: ``scale * (code - zero)`` of the group ``column // group_size``."""
    codes = unpack_bitplanes(words, bits, columns).float()
    group = torch.arange(columns, device=words.device) // group_size
    return scales.float()[:, group] * (codes - zeros.float()[:, group])


def lut_rows_matmul(x: torch.Tensor, words: torch.Tensor, lut: torch.Tensor, bits: int,
                    in_features: int) -> torch.Tensor:
    """Per-row codebooks: ``x (..., in) @ W.T`` for the block's rows W (rows, in) -> (..., rows)."""
    return x @ decode_lut(words, lut, bits, in_features).to(x.dtype).t()


def lut_cols_matmul(x: torch.Tensor, words: torch.Tensor, lut: torch.Tensor, bits: int,
                    out_features: int) -> torch.Tensor:
    """Per-column codebooks: ``x (..., cols) @ W`` for the block's columns, packed as W (cols, out)."""
    return x @ decode_lut(words, lut, bits, out_features).to(x.dtype)


def affine_matmul(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                  group_size: int, columns: int) -> torch.Tensor:
    """Affine groups: ``x (..., columns) @ W.T`` for the block's columns W (out, columns) -> (..., out)."""
    return x @ decode_affine(words, scales, zeros, bits, group_size, columns).to(x.dtype).t()


def codes_at(words: torch.Tensor, bits: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Codes at (rows[i], cols[i]) of a packed block, read bit by bit instead of unpacking it all."""
    planes = torch.arange(bits, device=words.device)
    picked = words[rows[:, None], (cols // CHUNK * bits)[:, None] + planes]  # (n, bits): the code's bit-planes
    return (((picked.long() >> (cols % CHUNK)[:, None]) & 1) << planes).sum(1)
