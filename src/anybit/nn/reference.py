"""Reading single codes out of a bit-plane packed block (``formats/bitpack.py``) without
unpacking it all: what the outlier correction of the kernel path needs."""

from __future__ import annotations

import torch

from anybit.formats.bitpack import CHUNK


def codes_at(words: torch.Tensor, bits: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Codes at (rows[i], cols[i]) of a packed block, read bit by bit instead of unpacking it all."""
    planes = torch.arange(bits, device=words.device)
    picked = words[rows[:, None], (cols // CHUNK * bits)[:, None] + planes]  # (n, bits): the code's bit-planes
    return (((picked.long() >> (cols % CHUNK)[:, None]) & 1) << planes).sum(1)
