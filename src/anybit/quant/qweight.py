"""The quantized matrix every method produces, and its honest bit count.

A ``QuantizedWeight`` holds integer codes on per-unit grids plus optional extras; it knows how
to de-quantize itself and how many bits storing it takes. It is the contract between the
quantizers (which build it), the checkpoint format (which packs it) and the kernels (which
compute with it). Two grid kinds cover the methods:

- ``lut``: a codebook per unit -- per row (``lut_axis`` 0: SqueezeLLM, SKIM) or per column
  (``lut_axis`` 1: CMPQ, CLAQ); ``bits`` holds each unit's width.
- ``affine``: ``scale * (code - zero)`` per row and group of columns (RTN, GPTQ, SliM-LLM);
  ``bits`` holds each column group's width.

Extras: ``perm`` (stored column k is original column perm[k], e.g. GPTQ act-order),
``input_scale`` (per input column divisor, SKIM's scaling vector) and ``outliers`` (sparse
fp16 values that replace the de-quantized weight at their positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

FP16_BITS = 16
WIDTH_BITS = 8  # one uint8 width per unit when widths are mixed
PACK_CHUNK = 32  # the packed format stores codes 32 at a time along a row (formats/bitpack.py)


def index_bits(n: int) -> int:
    """Bits of the integer type that stores indices below ``n`` (int16 or int32)."""
    return 16 if n <= 2**15 else 32


@dataclass
class Outliers:
    """Sparse weights kept in fp16 (CSR when stored): flat positions into the (out x in) matrix."""

    positions: torch.Tensor  # int64, flat index row * in + col, sorted
    values: torch.Tensor  # fp16

    def storage_bits(self, out_features: int, in_features: int) -> int:
        nnz = self.positions.numel()
        if nnz == 0:
            return 0
        return nnz * (FP16_BITS + index_bits(in_features)) + (out_features + 1) * 32


@dataclass
class QuantizedWeight:
    out_features: int
    in_features: int
    codes: torch.Tensor  # uint8 (out, in), columns in stored order
    bits: torch.Tensor  # int per unit: rows/cols (lut) or column groups (affine)
    lut: torch.Tensor | None = None  # fp16 (units, 2**max(bits)); entries past 2**bits unused
    lut_axis: int = 0
    scales: torch.Tensor | None = None  # fp16 (out, groups)
    zeros: torch.Tensor | None = None  # fp16 (out, groups), integer-valued
    group_size: int = 0  # affine: columns per group, 0 = whole row
    perm: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None  # fp16 (in,)
    outliers: Outliers | None = None
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "lut" if self.lut is not None else "affine"

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def to(self, device) -> "QuantizedWeight":
        """The same weight with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        if self.outliers is not None:
            moved["outliers"] = Outliers(self.outliers.positions.to(device), self.outliers.values.to(device))
        return replace(self, **moved)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.codes.long()
        if self.lut is not None:
            lut = self.lut.float()
            if self.lut_axis == 0:
                w = torch.gather(lut, 1, codes)
            else:
                w = torch.gather(lut, 1, codes.t()).t()
        else:
            g = self.group_size or self.in_features
            scales = self.scales.float().repeat_interleave(g, 1)[:, : self.in_features]
            zeros = self.zeros.float().repeat_interleave(g, 1)[:, : self.in_features]
            w = scales * (codes.float() - zeros)
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        if self.input_scale is not None:
            w = w / self.input_scale.float()[None, :]
        if self.outliers is not None and self.outliers.positions.numel():
            w = w.reshape(-1)
            w[self.outliers.positions] = self.outliers.values.float()
            w = w.reshape(self.out_features, self.in_features)
        return w.to(dtype)

    def unit_lengths(self) -> torch.Tensor:
        """How many weights each entry of ``bits`` covers."""
        if self.lut is not None:
            n = self.in_features if self.lut_axis == 0 else self.out_features
            return torch.full_like(self.bits, n, dtype=torch.long)
        g = self.group_size or self.in_features
        sizes = torch.full((self.bits.numel(),), g, dtype=torch.long)
        sizes[-1] = self.in_features - g * (self.bits.numel() - 1)
        return sizes * self.out_features

    def code_bits(self) -> int:
        return int((self.bits.long() * self.unit_lengths()).sum())

    def padding_bits(self) -> int:
        """Code bits the packed format stores past the end of each packed row: codes go 32 at a time
        along each lut unit, or along the columns of all groups of one width (affine)."""
        if self.lut is not None:
            length = self.in_features if self.lut_axis == 0 else self.out_features
            return int(self.bits.long().sum()) * (-length % PACK_CHUNK)
        widths = self.bits.cpu()
        group_columns = self.unit_lengths() // self.out_features
        return self.out_features * sum(
            bits * (-int(group_columns[widths == bits].sum()) % PACK_CHUNK) for bits in widths.unique().tolist()
        )

    def storage_bits(self) -> dict[str, int]:
        """Every stored bit, by part. Their sum over all parts is the honest size."""
        parts = {"codes": self.code_bits()}
        padding = self.padding_bits()
        if padding:
            parts["padding"] = padding
        if self.lut is not None:
            parts["codebooks"] = int((FP16_BITS * (2 ** self.bits.long())).sum())
        else:
            parts["scales_zeros"] = 2 * FP16_BITS * self.scales.numel()
        if self.bits.numel() > 1 and bool((self.bits != self.bits[0]).any()):
            parts["widths"] = WIDTH_BITS * self.bits.numel()
        if self.perm is not None:
            parts["perm"] = index_bits(self.in_features) * self.in_features
        if self.input_scale is not None:
            parts["input_scale"] = FP16_BITS * self.in_features
        if self.outliers is not None:
            parts["outliers"] = self.outliers.storage_bits(self.out_features, self.in_features)
        return parts

    def total_bits(self) -> int:
        return sum(self.storage_bits().values())

    def bits_per_weight(self) -> float:
        return self.total_bits() / self.numel

    def index_bits_per_weight(self) -> float:
        """The papers' figure: code bits only, codebooks/scales/outliers left out."""
        return self.code_bits() / self.numel


def stack_rows(weights: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """One weight whose rows are those of ``weights`` in turn: linears that read the same input
    (a block's q, k and v projections, its gate and up projections) as one matrix, so that one
    kernel call computes them all. Each row keeps its codes, codebook or scales and width; the
    input side must be shared: a per-row grid (``lut`` with ``lut_axis`` 0, or ``affine`` with
    equal groups and group widths), equal ``perm`` and ``input_scale``."""
    first = weights[0]
    for w in weights[1:]:
        if (w.kind, w.in_features, w.lut_axis, w.group_size) != (first.kind, first.in_features, first.lut_axis,
                                                                 first.group_size):
            raise ValueError("stack_rows: the weights differ in grid, input features or group size")
        for name in ("perm", "input_scale"):
            a, b = getattr(first, name), getattr(w, name)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                raise ValueError(f"stack_rows: the weights have different {name}")
        if w.kind == "affine" and not torch.equal(w.bits, first.bits):
            raise ValueError("stack_rows: affine weights with different group widths")
    if first.kind == "lut" and first.lut_axis != 0:
        raise ValueError("stack_rows: per-column codebooks (lut_axis 1) belong to one matrix")
    offsets = [0]
    for w in weights:
        offsets.append(offsets[-1] + w.out_features)
    cat = lambda name: torch.cat([getattr(w, name) for w in weights])  # noqa: E731
    parts = dict(out_features=offsets[-1], codes=cat("codes"), meta={})
    if first.kind == "lut":
        width = max(w.lut.shape[1] for w in weights)
        parts.update(bits=cat("bits"), lut=torch.cat([torch.nn.functional.pad(w.lut, (0, width - w.lut.shape[1]))
                                                      for w in weights]))
    else:
        parts.update(scales=cat("scales"), zeros=cat("zeros"))
    if any(w.outliers is not None for w in weights):
        kept = [(w.outliers, start * first.in_features) for w, start in zip(weights, offsets) if w.outliers is not None]
        parts["outliers"] = Outliers(torch.cat([o.positions + shift for o, shift in kept]),
                                     torch.cat([o.values for o, _ in kept]))
    return replace(first, **parts)
