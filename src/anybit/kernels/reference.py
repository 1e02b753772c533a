"""Pure-torch reference of the LUT linear kernels: the exact function the Triton kernels compute.

For one width block of ``rows_b`` rows, with bit-plane packed codes (``anybit.formats.bitpack``)
and one fp16 codebook per row::

    y[m, row_index[r]] = sum_k  xs[m, k] * lut[r, code[r, k]]      (fp32 accumulation)
    xs = x / input_scale   (when given; per input column)

and, when ``outliers`` (a sparse (out_features x in_features) CSR matrix S) is given, afterwards
``y += x @ S^T`` on the raw ``x`` (not divided by ``input_scale``). Rows of ``out`` that are not
in ``row_index`` are left as they are. The result is rounded once to the dtype of ``out``.
"""

from __future__ import annotations

import torch

from anybit.formats.bitpack import packed_words, unpack_bitplanes


def csr_parts(outliers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow, col, values) of a torch sparse CSR tensor or of a (crow, col, values) tuple."""
    if isinstance(outliers, torch.Tensor):
        if outliers.layout != torch.sparse_csr:
            raise ValueError("outliers must be a sparse CSR tensor or a (crow, col, values) tuple")
        return outliers.crow_indices(), outliers.col_indices(), outliers.values()
    crow, col, values = outliers
    return crow, col, values


def check_block(codes: torch.Tensor, lut: torch.Tensor, bits: int, in_features: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if codes.dtype != torch.int32 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D int32 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if codes.shape[1] != packed_words(in_features, bits):
        raise ValueError(f"codes have {codes.shape[1]} words per row, expected "
                         f"{packed_words(in_features, bits)} for {in_features} columns at {bits} bits")
    if lut.dim() != 2 or lut.shape[0] != codes.shape[0] or lut.shape[1] < 2**bits:
        raise ValueError(f"lut must be (rows, >= 2**bits) = ({codes.shape[0]}, >= {2**bits}), "
                         f"got {tuple(lut.shape)}")


def output_for(x2: torch.Tensor, rows: int, row_index, out, out_features, lead) -> torch.Tensor:
    """The (M, out_features) view that results are written to, allocated when ``out`` is None."""
    if out is None:
        if row_index is not None and out_features is None:
            raise ValueError("with row_index, pass out= or out_features=")
        n = rows if out_features is None else out_features
        return torch.zeros(x2.shape[0], n, dtype=x2.dtype, device=x2.device)
    if out.shape[:-1] != lead:
        raise ValueError(f"out leading shape {tuple(out.shape[:-1])} != x leading shape {tuple(lead)}")
    if row_index is None and out.shape[-1] != rows:
        raise ValueError(f"out has {out.shape[-1]} columns, block has {rows} rows and no row_index")
    return out.view(-1, out.shape[-1])


def dequantize_block(codes: torch.Tensor, lut: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """fp32 (rows_b, in_features) weights of one width block."""
    idx = unpack_bitplanes(codes, bits, in_features).long()
    return torch.gather(lut[:, : 2**bits].float(), 1, idx)


def add_outliers_ref(x2: torch.Tensor, outliers, y2: torch.Tensor) -> None:
    crow, col, values = csr_parts(outliers)
    rows = crow.numel() - 1
    counts = (crow[1:] - crow[:-1]).long()
    r = torch.repeat_interleave(torch.arange(rows, device=crow.device), counts)
    dense = torch.zeros(rows, x2.shape[1], dtype=torch.float32, device=x2.device)
    dense.index_put_((r.to(x2.device), col.long().to(x2.device)), values.float().to(x2.device), accumulate=True)
    y2.copy_((y2.float() + x2.float() @ dense.t()).to(y2.dtype))


def lut_linear_ref(x, codes, lut, bits, in_features, row_index=None, out=None, *,
                   input_scale=None, outliers=None, out_features=None):
    check_block(codes, lut, bits, in_features)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, expected {in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    y2 = output_for(x2, codes.shape[0], row_index, out, out_features, lead)
    xs = x2.float()
    if input_scale is not None:
        xs = xs / input_scale.float()
    yb = xs @ dequantize_block(codes, lut, bits, in_features).t()
    if row_index is None:
        y2.copy_(yb.to(y2.dtype))
    else:
        y2[:, row_index.long()] = yb.to(y2.dtype)
    if outliers is not None:
        add_outliers_ref(x2, outliers, y2)
    return y2.view(*lead, y2.shape[-1])
