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


# Rows packed or unpacked at a time on a CPU: intermediates of about this many int32 values stay
# in its caches, several times faster than one pass over a whole large matrix (an AnybitLinear's
# CPU forward decodes its weight: benchmarks/torch_forward.py). A GPU takes the whole matrix in
# one pass: parts would only add launches.
PART_CODES = 1 << 19
# Bit i of a word as an int32 (bit 31 is the sign bit): the words of disjoint bits add up exactly.
_BIT = torch.tensor([(1 << i) - (1 << 32 if i == 31 else 0) for i in range(CHUNK)], dtype=torch.int32)


def _row_parts(rows: int, values_per_row: int, device: torch.device):
    """Slices of rows holding about PART_CODES intermediate values each (all rows off the CPU)."""
    step = max(1, PART_CODES // max(1, values_per_row)) if device.type == "cpu" else max(1, rows)
    return (slice(r, r + step) for r in range(0, rows, step))


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (rows, cols) with values < 2**bits into int32 (rows, chunks * bits)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    rows, cols = codes.shape
    chunks = -(-cols // CHUNK)
    c = torch.zeros(rows, chunks * CHUNK, dtype=torch.int32, device=codes.device)
    c[:, :cols] = codes
    c = c.view(rows, chunks, 1, CHUNK)
    shifts = torch.arange(bits, dtype=torch.int32, device=codes.device).view(1, 1, bits, 1)
    bit = _BIT.to(codes.device)
    words = torch.empty(rows, chunks, bits, dtype=torch.int32, device=codes.device)
    for part in _row_parts(rows, chunks * CHUNK * bits, codes.device):  # bits int32 intermediates a code
        words[part] = (((c[part] >> shifts) & 1) * bit).sum(-1, dtype=torch.int32)
    return words.view(rows, chunks * bits)


def unpack_bitplanes(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of ``pack_bitplanes``: uint8 codes (rows, cols)."""
    rows = words.shape[0]
    chunks = words.shape[1] // bits
    w = words.view(rows, chunks, bits)
    # int32 arithmetic shifts are exact here: only bit 0 of each shifted word is kept, so the sign
    # bit a negative word (bit 31 set) drags in is masked away.
    bitpos = torch.arange(CHUNK, dtype=torch.int32, device=words.device)
    codes = torch.empty(rows, chunks, CHUNK, dtype=torch.uint8, device=words.device)
    for part in _row_parts(rows, chunks * CHUNK, words.device):
        out = codes[part]
        out.copy_((w[part, :, 0, None] >> bitpos) & 1)
        for p in range(1, bits):
            out |= (((w[part, :, p, None] >> bitpos) & 1) << p).to(torch.uint8)
    codes = codes.view(rows, chunks * CHUNK)
    return codes if cols == codes.shape[1] else codes[:, :cols].contiguous()


def transpose_packed(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The codes of a packed (rows x cols) matrix packed the other way: (cols x rows), packed along rows."""
    return pack_bitplanes(unpack_bitplanes(words, bits, cols).t(), bits)
