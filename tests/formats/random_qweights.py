"""Hand-built ``QuantizedWeight``s with every field the format must carry: random per-unit widths
1..8, per-row or per-column codebooks or affine groups, perm, input_scale and outliers."""

from __future__ import annotations

import torch

from anybit.quant.qweight import Outliers, QuantizedWeight


def _codes_below(limits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """uint8 codes, each below its entry of ``limits`` (broadcast shape)."""
    return (torch.randint(0, 256, limits.shape, generator=g) % limits).to(torch.uint8)


def random_lut(out: int, inn: int, lut_axis: int = 0, seed: int = 0, widths=(1, 8)) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    units = out if lut_axis == 0 else inn
    bits = torch.randint(widths[0], widths[1] + 1, (units,), generator=g, dtype=torch.int32)
    lut = torch.randn(units, 2 ** int(bits.max()), generator=g).half()
    limits = (2 ** bits.long()).view(-1, 1) if lut_axis == 0 else (2 ** bits.long()).view(1, -1)
    codes = _codes_below(limits.expand(out, inn), g)
    return QuantizedWeight(out, inn, codes, bits, lut=lut, lut_axis=lut_axis)


def random_affine(out: int, inn: int, group_size: int = 0, seed: int = 0, widths=(1, 8)) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    n_groups = -(-inn // group_size) if group_size else 1
    bits = torch.randint(widths[0], widths[1] + 1, (n_groups,), generator=g, dtype=torch.int32)
    column_bits = bits.repeat_interleave(group_size or inn)[:inn]
    codes = _codes_below((2 ** column_bits.long()).view(1, -1).expand(out, inn), g)
    scales = (torch.rand(out, n_groups, generator=g) * 0.1 + 0.01).half()
    zeros = (torch.randint(0, 256, (out, n_groups), generator=g) % 2 ** bits.long()).half()
    return QuantizedWeight(out, inn, codes, bits, scales=scales, zeros=zeros, group_size=group_size)


def with_extras(q: QuantizedWeight, seed: int = 0, perm: bool = True, input_scale: bool = True,
                outliers: int = 7) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    if perm:
        q.perm = torch.randperm(q.in_features, generator=g)
    if input_scale:
        q.input_scale = (torch.rand(q.in_features, generator=g) + 0.5).half()
    if outliers:
        positions = torch.randperm(q.numel, generator=g)[:outliers].sort().values
        q.outliers = Outliers(positions, (torch.randn(outliers, generator=g) * 3).half())
    return q


def all_kinds(out: int = 37, inn: int = 45, seed: int = 0) -> dict[str, QuantizedWeight]:
    """One weight of each layout, odd shapes, mixed widths, every extra."""
    return {
        "lut-rows": with_extras(random_lut(out, inn, 0, seed), seed),
        "lut-cols": with_extras(random_lut(out, inn, 1, seed), seed),
        "affine-groups": with_extras(random_affine(out, inn, 8, seed), seed),
        "affine-channel": with_extras(random_affine(out, inn, 0, seed), seed, outliers=0),
        "lut-uniform": random_lut(out, inn, 0, seed, widths=(3, 3)),
    }
