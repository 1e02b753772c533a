"""Per-row codebooks at candidate widths: the error table mixed-precision allocation reads.

For each candidate width b every row gets its own weighted k-means codebook (2^b fp16 entries);
the table records each row's layer-output error at each width and the honest bits each choice
stores. Choosing a width per row then only selects among results already computed, because
rows are clustered independently (SKIM's "re-cluster at the allocated widths" is this lookup).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anybit.quant.kmeans import decode, kmeans_codebooks
from anybit.quant.lfull import row_output_error
from anybit.quant.qweight import FP16_BITS


@dataclass
class RowCodebookTable:
    widths: tuple[int, ...]
    luts: list[torch.Tensor]  # per candidate: (R, 2^b) fp16
    codes: list[torch.Tensor]  # per candidate: (R, n) uint8
    err: torch.Tensor  # (R, C) layer-output error
    cost: torch.Tensor  # (R, C) stored bits: codes + codebook

    def assemble(self, choice: torch.Tensor):
        """(lut (R, 2^max) fp16, codes (R, n) uint8, bits (R,)) for one candidate index per row."""
        rows, n = self.codes[0].shape
        choice = choice.to(self.codes[0].device)
        bits = torch.tensor(self.widths, device=choice.device)[choice]
        kmax = 2 ** int(bits.max())
        lut = torch.zeros(rows, kmax, dtype=torch.float16, device=self.luts[0].device)
        codes = torch.empty(rows, n, dtype=torch.uint8, device=self.codes[0].device)
        for c, b in enumerate(self.widths):
            sel = choice == c
            if bool(sel.any()):
                lut[sel, : 2**b] = self.luts[c][sel]
                codes[sel] = self.codes[c][sel]
        return lut, codes, bits.to(torch.int32)


def row_codebook_cost(n_cols: int, widths) -> torch.Tensor:
    """Bits one row stores at each width: n codes of b bits plus 2^b fp16 centroids."""
    return torch.tensor([n_cols * b + FP16_BITS * 2**b for b in widths], dtype=torch.float64)


def row_codebook_table(w: torch.Tensor, s: torch.Tensor, h: torch.Tensor, widths) -> RowCodebookTable:
    """Cluster every row at every candidate width; measure each row's L-full error."""
    luts, codes, errs = [], [], []
    for b in widths:
        lut, code = kmeans_codebooks(w, s, b)
        luts.append(lut)
        codes.append(code)
        errs.append(row_output_error(w, decode(lut, code), h))
    cost = row_codebook_cost(w.shape[1], widths).expand(w.shape[0], -1)
    return RowCodebookTable(tuple(widths), luts, codes, torch.stack(errs, 1).double().cpu(), cost.clone())
