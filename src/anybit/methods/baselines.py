"""The baselines: RTN, GPTQ and SqueezeLLM (uniform-width weighted k-means)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from anybit.methods.base import check_group_size, integer_bits
from anybit.quant.gptq import act_order_permutation, gptq_quantize
from anybit.quant.kmeans import kmeans_codebooks
from anybit.quant.qweight import QuantizedWeight
from anybit.quant.uniform import AffineColumnQuantizer, rtn_quantize


def _affine_weight(weight, codes, scales, zeros, bits, group_size, perm=None) -> QuantizedWeight:
    rows, cols = weight.shape
    n_groups = scales.shape[1]
    return QuantizedWeight(
        rows, cols, codes.to(torch.uint8), torch.full((n_groups,), bits, dtype=torch.int32),
        scales=scales.to(torch.float16), zeros=zeros.to(torch.float16), group_size=group_size,
        perm=perm,
    )


@dataclass
class RTN:
    """Round-to-nearest on min-max grids, per channel or per group."""

    bits: int
    group_size: int = 0
    name = "rtn"
    needs_stats = False

    @classmethod
    def from_options(cls, bits, group_size=0, **_):
        return cls(integer_bits(cls.name, bits), check_group_size(group_size))

    def quantize(self, weight, stats, name=None) -> QuantizedWeight:
        codes, scales, zeros = rtn_quantize(weight.float(), self.bits, self.group_size)
        return _affine_weight(weight, codes, scales, zeros, self.bits, self.group_size)


@dataclass
class GPTQ:
    """GPTQ error feedback on min-max grids (blocks of 128, damp 1%, optional act-order)."""

    bits: int
    group_size: int = 0
    act_order: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    name = "gptq"

    @classmethod
    def from_options(cls, bits, group_size=0, act_order=False, percdamp=0.01, **_):
        return cls(integer_bits(cls.name, bits), check_group_size(group_size), act_order, percdamp)

    def quantize(self, weight, stats, name=None) -> QuantizedWeight:
        rows, cols = weight.shape
        n_groups = math.ceil(cols / self.group_size) if self.group_size else 1
        grid = AffineColumnQuantizer(rows, cols, torch.full((n_groups,), self.bits), self.group_size,
                                     device=weight.device)
        perm = act_order_permutation(stats.hessian) if self.act_order else None
        gptq_quantize(weight, stats.hessian, grid, self.blocksize, self.percdamp, perm)
        return _affine_weight(weight, grid.codes, grid.scales, grid.zeros, self.bits, self.group_size,
                              perm.to(torch.int32) if perm is not None else None)


@dataclass
class SqueezeLLM:
    """Per-row k-means codebooks weighted by input sensitivity diag(H), uniform width."""

    bits: int
    name = "squeezellm"

    @classmethod
    def from_options(cls, bits, **_):
        return cls(integer_bits(cls.name, bits))

    def quantize(self, weight, stats, name=None) -> QuantizedWeight:
        rows, cols = weight.shape
        sensitivity = stats.act_sq.to(weight.device)[None, :].expand(rows, cols)
        lut, codes = kmeans_codebooks(weight.float(), sensitivity, self.bits)
        return QuantizedWeight(rows, cols, codes, torch.full((rows,), self.bits, dtype=torch.int32), lut=lut)
