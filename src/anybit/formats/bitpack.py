"""Bit-plane packing of b-bit codes into int32 words, 32 columns at a time.

For each row and each chunk of 32 consecutive columns, ``b`` words are stored: word ``p`` of
the chunk holds bit ``p`` of the chunk's 32 codes (bit ``i`` of the word belongs to column
``32 * chunk + i``). Every width 1..8 uses the same rule, no code straddles a word, and a
kernel unpacks a column with ``b`` shifts and masks. Columns past ``in_features`` are padded
with code 0. Packed shape: (rows, ceil(cols / 32) * b), word index ``chunk * b + p``.
"""

from __future__ import annotations

import torch

CHUNK = 32


def packed_words(cols: int, bits: int) -> int:
    return -(-cols // CHUNK) * bits


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (rows, cols) with values < 2**bits into int32 (rows, chunks * bits)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    rows, cols = codes.shape
    chunks = -(-cols // CHUNK)
    c = torch.zeros(rows, chunks * CHUNK, dtype=torch.int64, device=codes.device)
    c[:, :cols] = codes.to(torch.int64)
    c = c.view(rows, chunks, 1, CHUNK)
    planes = (c >> torch.arange(bits, device=codes.device).view(1, 1, bits, 1)) & 1  # (rows, chunks, bits, 32)
    weights = torch.ones(CHUNK, dtype=torch.int64, device=codes.device) << torch.arange(CHUNK, device=codes.device)
    words = (planes * weights).sum(-1)  # < 2**32, as unsigned
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as int32
    return words.to(torch.int32).view(rows, chunks * bits)


def unpack_bitplanes(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of ``pack_bitplanes``: uint8 codes (rows, cols)."""
    rows = words.shape[0]
    chunks = words.shape[1] // bits
    w = words.to(torch.int64).view(rows, chunks, bits, 1) & 0xFFFFFFFF
    bitpos = torch.arange(CHUNK, device=words.device).view(1, 1, 1, CHUNK)
    planes = (w >> bitpos) & 1  # (rows, chunks, bits, 32)
    shifts = torch.arange(bits, device=words.device).view(1, 1, bits, 1)
    codes = (planes << shifts).sum(2)  # (rows, chunks, 32)
    return codes.view(rows, chunks * CHUNK)[:, :cols].to(torch.uint8)
