"""One quantized linear as packed tensors, and back: the per-module half of docs/format.md.

A ``QuantizedWeight`` becomes one packed block per code width. The *units* that carry a width
are rows (``lut``, ``lut_axis`` 0), columns (``lut``, ``lut_axis`` 1) or column groups
(``affine``). The units of width ``b`` are taken in increasing index order -- exactly the order a
stable argsort of the uint8 ``widths`` tensor gives -- so no permutation is stored. Each block
is a code matrix packed along its second axis by ``pack_bitplanes``:

- lut, axis 0: the block's rows, (units_b, in_features), with fp16 codebooks (units_b, 2**b);
- lut, axis 1: the block's columns transposed, (units_b, out_features), codebooks likewise;
- affine: the columns of the block's groups, (out_features, columns_b), with fp16 scales and
  zeros (out_features, groups_b). Only the last group of a matrix can be short, and it stays
  last in its block, so column ``c`` of a block belongs to the block's group ``c // group_size``.

``LinearSpec`` is what config.json records per module: enough to know every tensor's name,
shape and dtype before reading any of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from anybit.errors import AnybitError
from anybit.formats.bitpack import pack_bitplanes, packed_words, unpack_bitplanes
from anybit.quant.qweight import Outliers, QuantizedWeight, index_bits

GRIDS = ("lut", "affine")
JSON_KINDS = {int: "an integer", bool: "true or false", str: "a string", dict: "an object"}
MAX_WIDTH = 8


def index_dtype(n: int) -> torch.dtype:
    """The integer type that stores indices below ``n``; the same rule as the bit accounting."""
    return torch.int16 if index_bits(n) == 16 else torch.int32


def codes_name(bits: int) -> str:
    return f"codes_{bits}bit"


def lut_name(bits: int) -> str:
    return f"lut_{bits}bit"


def scales_name(bits: int) -> str:
    return f"scales_{bits}bit"


def zeros_name(bits: int) -> str:
    return f"zeros_{bits}bit"


@dataclass(frozen=True)
class LinearSpec:
    """The layout of one packed linear. ``blocks[b]`` is the (rows, columns) shape of the width-b
    code block before packing; ``outliers`` is their count."""

    grid: str
    out_features: int
    in_features: int
    blocks: dict[int, tuple[int, int]] = field(default_factory=dict)
    lut_axis: int = 0
    group_size: int = 0
    perm: bool = False
    input_scale: bool = False
    outliers: int = 0
    bias: bool = False

    @property
    def row_codebooks(self) -> bool:
        """A codebook per row (skim, squeezellm: the per-row kernels' layout)."""
        return self.grid == "lut" and self.lut_axis == 0

    @property
    def column_codebooks(self) -> bool:
        """A codebook per input column (cmpq, claq)."""
        return self.grid == "lut" and self.lut_axis == 1

    @property
    def group_columns(self) -> int:
        """Columns per affine group (the whole row when ``group_size`` is 0)."""
        return self.group_size or self.in_features

    @property
    def unit_length(self) -> int:
        """Codes per lut unit: a row holds ``in_features`` codes, a column ``out_features``."""
        return self.in_features if self.lut_axis == 0 else self.out_features

    @property
    def units(self) -> int:
        """Entries of the ``widths`` tensor: rows, columns or column groups."""
        if self.grid == "lut":
            return self.out_features if self.lut_axis == 0 else self.in_features
        return -(-self.in_features // self.group_columns)

    def block_units(self, bits: int) -> int:
        rows, cols = self.blocks[bits]
        return rows if self.grid == "lut" else -(-cols // self.group_columns)

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """Every stored tensor: name -> (shape, dtype). The bias keeps the model's dtype (None)."""
        specs = {}
        for bits, (rows, cols) in sorted(self.blocks.items()):
            specs[codes_name(bits)] = ((rows, packed_words(cols, bits)), torch.int32)
            if self.grid == "lut":
                specs[lut_name(bits)] = ((rows, 2**bits), torch.float16)
            else:
                specs[scales_name(bits)] = specs[zeros_name(bits)] = ((rows, self.block_units(bits)), torch.float16)
        if len(self.blocks) > 1:
            specs["widths"] = ((self.units,), torch.uint8)
        if self.perm:
            specs["perm"] = ((self.in_features,), index_dtype(self.in_features))
        if self.input_scale:
            specs["input_scale"] = ((self.in_features,), torch.float16)
        if self.outliers:
            specs["outlier_indptr"] = ((self.out_features + 1,), torch.int32)
            specs["outlier_indices"] = ((self.outliers,), index_dtype(self.in_features))
            specs["outlier_values"] = ((self.outliers,), torch.float16)
        if self.bias:
            specs["bias"] = ((self.out_features,), None)
        return specs

    def to_json(self) -> dict:
        data = asdict(self)
        data["blocks"] = {str(bits): list(shape) for bits, shape in sorted(self.blocks.items())}
        return data

    @classmethod
    def from_json(cls, data, where: str) -> LinearSpec:
        """Parse and check one module's entry; errors name the field (``where`` locates the entry)."""
        if not isinstance(data, dict):
            raise AnybitError(f"{where} must be an object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise AnybitError(f"{where} has unknown field {sorted(unknown)[0]!r}")

        def get(name, kind, default=None):
            value = data.get(name, default)
            if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise AnybitError(f"{where}.{name} is missing or not {JSON_KINDS[kind]}")
            return value

        blocks = {}
        for key, shape in get("blocks", dict).items():
            ok_key = key.isdigit() and 1 <= int(key) <= MAX_WIDTH
            ok_shape = isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape)
            if not (ok_key and ok_shape):
                raise AnybitError(f"{where}.blocks[{key!r}] must map a width 1..{MAX_WIDTH} to [rows, columns]")
            blocks[int(key)] = tuple(shape)
        spec = cls(get("grid", str), get("out_features", int), get("in_features", int), blocks,
                   get("lut_axis", int, 0), get("group_size", int, 0), get("perm", bool, False),
                   get("input_scale", bool, False), get("outliers", int, 0), get("bias", bool, False))
        problem = spec.inconsistency()
        if problem:
            raise AnybitError(f"{where}: {problem}")
        return spec

    def inconsistency(self) -> str | None:
        """Why the fields cannot describe a packed linear, or None."""
        if self.grid not in GRIDS:
            return f"grid {self.grid!r} is not one of {', '.join(GRIDS)}"
        if self.out_features < 1 or self.in_features < 1 or self.group_size < 0 or self.outliers < 0:
            return "out_features, in_features must be positive; group_size, outliers not negative"
        if self.lut_axis not in (0, 1):
            return f"lut_axis is {self.lut_axis}, not 0 or 1"
        if not self.blocks:
            return "blocks is empty"
        rows = [r for r, _ in self.blocks.values()]
        cols = [c for _, c in self.blocks.values()]
        if self.grid == "lut" and (sum(rows) != self.units or set(cols) != {self.unit_length}):
            return f"lut blocks {self.blocks} do not split {self.units} units of {self.unit_length} codes"
        if self.grid == "affine" and (set(rows) != {self.out_features} or sum(cols) != self.in_features
                                      or sum(map(self.block_units, self.blocks)) != self.units):
            return f"affine blocks {self.blocks} do not split {self.units} groups of {self.out_features} rows"
        return None


def _outliers_to_csr(outliers: Outliers, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
    positions, order = outliers.positions.cpu().sort()  # CSR wants row-major order
    values = outliers.values.cpu()[order]
    rows = torch.div(positions, in_features, rounding_mode="floor")
    indptr = torch.zeros(out_features + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=out_features), 0)
    return {
        "outlier_indptr": indptr,
        "outlier_indices": (positions % in_features).to(index_dtype(in_features)),
        "outlier_values": values.to(torch.float16),
    }


def outlier_rows_cols(indptr: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR back to (row, column) int64 pairs."""
    rows = torch.repeat_interleave(torch.arange(indptr.numel() - 1, device=indptr.device), torch.diff(indptr.long()))
    return rows, indices.long()


def affine_column_widths(widths: torch.Tensor, group_columns: int, in_features: int) -> torch.Tensor:
    """Each column's width, from the per-group widths."""
    return widths.repeat_interleave(group_columns)[:in_features]


def pack_weight(q: QuantizedWeight) -> tuple[LinearSpec, dict[str, torch.Tensor]]:
    """Pack ``q``: its layout and its tensors by name (names as in ``LinearSpec.tensor_specs``).
    Codes are packed where they are (a GPU packs a 7B model in seconds); the tensors returned are
    on the CPU."""
    widths = q.bits.to(torch.uint8).cpu()
    tensors: dict[str, torch.Tensor] = {}
    blocks: dict[int, tuple[int, int]] = {}
    codes = q.codes
    if q.kind == "lut":
        unit_codes = codes if q.lut_axis == 0 else codes.t()
        for bits in widths.unique().tolist():
            units = (widths == bits).nonzero().squeeze(1)
            tensors[codes_name(bits)] = pack_bitplanes(unit_codes[units.to(codes.device)], bits).cpu()
            tensors[lut_name(bits)] = q.lut.cpu()[units, : 2**bits].to(torch.float16)
            blocks[bits] = (units.numel(), unit_codes.shape[1])
    else:
        group_columns = q.group_size or q.in_features
        column_widths = affine_column_widths(widths, group_columns, q.in_features)
        for bits in widths.unique().tolist():
            columns = (column_widths == bits).nonzero().squeeze(1)
            groups = (widths == bits).nonzero().squeeze(1)
            tensors[codes_name(bits)] = pack_bitplanes(codes[:, columns.to(codes.device)], bits).cpu()
            tensors[scales_name(bits)] = q.scales.cpu()[:, groups].to(torch.float16)
            tensors[zeros_name(bits)] = q.zeros.cpu()[:, groups].to(torch.float16)
            blocks[bits] = (q.out_features, columns.numel())
    if len(blocks) > 1:
        tensors["widths"] = widths
    if q.perm is not None:
        tensors["perm"] = q.perm.cpu().to(index_dtype(q.in_features))
    if q.input_scale is not None:
        tensors["input_scale"] = q.input_scale.cpu().to(torch.float16)
    n_outliers = q.outliers.positions.numel() if q.outliers is not None else 0
    if n_outliers:
        tensors.update(_outliers_to_csr(q.outliers, q.out_features, q.in_features))
    spec = LinearSpec(q.kind, q.out_features, q.in_features, blocks, q.lut_axis if q.kind == "lut" else 0,
                      q.group_size if q.kind == "affine" else 0, q.perm is not None, q.input_scale is not None,
                      n_outliers)
    return spec, tensors


def unit_widths(spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The uint8 width of every unit (stored only when widths are mixed)."""
    if "widths" in tensors:
        return tensors["widths"]
    (bits,) = spec.blocks
    return torch.full((spec.units,), bits, dtype=torch.uint8, device=next(iter(tensors.values())).device)


def unpack_weight(spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    """Inverse of ``pack_weight``. Codebook entries past a unit's 2**bits come back as zeros."""
    widths = unit_widths(spec, tensors)
    device = widths.device
    max_bits = max(spec.blocks)
    extras = {}
    if spec.grid == "lut":
        unit_codes = torch.zeros(spec.units, spec.unit_length, dtype=torch.uint8, device=device)
        lut = torch.zeros(spec.units, 2**max_bits, dtype=torch.float16, device=device)
        for bits in spec.blocks:
            units = (widths == bits).nonzero().squeeze(1)
            unit_codes[units] = unpack_bitplanes(tensors[codes_name(bits)], bits, spec.unit_length)
            lut[units, : 2**bits] = tensors[lut_name(bits)]
        codes = unit_codes if spec.lut_axis == 0 else unit_codes.t().contiguous()
        extras.update(lut=lut, lut_axis=spec.lut_axis)
    else:
        codes = torch.zeros(spec.out_features, spec.in_features, dtype=torch.uint8, device=device)
        scales = torch.zeros(spec.out_features, spec.units, dtype=torch.float16, device=device)
        zeros = torch.zeros_like(scales)
        column_widths = affine_column_widths(widths, spec.group_columns, spec.in_features)
        for bits, (_, cols) in spec.blocks.items():
            groups = (widths == bits).nonzero().squeeze(1)
            codes[:, column_widths == bits] = unpack_bitplanes(tensors[codes_name(bits)], bits, cols)
            scales[:, groups] = tensors[scales_name(bits)]
            zeros[:, groups] = tensors[zeros_name(bits)]
        extras.update(scales=scales, zeros=zeros, group_size=spec.group_size)
    if spec.perm:
        extras["perm"] = tensors["perm"].long()
    if spec.input_scale:
        extras["input_scale"] = tensors["input_scale"]
    if spec.outliers:
        rows, cols = outlier_rows_cols(tensors["outlier_indptr"], tensors["outlier_indices"])
        extras["outliers"] = Outliers(rows * spec.in_features + cols, tensors["outlier_values"])
    return QuantizedWeight(spec.out_features, spec.in_features, codes, widths.to(torch.int32), **extras)
