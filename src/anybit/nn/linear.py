"""``AnybitLinear``: a linear layer that keeps its weight packed (docs/format.md) and computes with it.

The packed tensors are buffers named as in the checkpoint, so ``state_dict`` is the on-disk
layout. Forward, where a GPU kernel exists for the grid (per-row codebooks on CUDA): permute the
input once, then the kernels write every width block's rows straight into the output (input
scale applied inside; one launch for up to two blocks), and one more launch adds the sparse
outliers' correction; the weight is never decoded as a whole. Where the tensor-core kernels run,
the first forward keeps the codes of blocks of up to 4 bits in their tiled order instead of the
stored one (``keep_tiled_codes``: still one copy); ``state_dict`` and ``packed`` untile them. Affine grids and
per-column codebooks on CUDA, for calls of up to ``triton_grid.MAX_BATCH`` rows, where ``kernels.grid_kernels_on``:
``triton_grid``'s kernels, which decode a tile of codes at a time and read x through one index a block
(per-column codes then kept packed along the columns: ``keep_row_codes``). Everywhere else the
pure-torch path decodes the weight (unpack + codebook lookup) for the one matmul and drops it:
the same dense product the in-memory quantized model computes, so a saved-and-loaded model
gives identical logits.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from anybit.formats.bitpack import transpose_packed
from anybit.formats.packed import (
    LinearSpec, affine_column_widths, codes_name, lut_name, outlier_rows_cols, pack_weight, scales_name,
    unit_widths, unpack_weight, zeros_name,
)
from anybit.kernels.tiling import untile_codes
from anybit.nn import compiled, reference
from anybit.quant.qweight import QuantizedWeight, stack_rows


# Non-persistent buffers of ``keep_tiled_codes``: a block's codes in the tiled order, its subset coefficients.
TILED_CODES = "tiled_codes_{}"
SUBSET_COEF = "subset_coef_{}"
# Non-persistent buffer of ``keep_row_codes``: a per-column-codebook block's codes packed along its columns.
ROW_CODES = "row_codes_{}"
# Rows of x up to which a call's launches are planned once and kept (``_launch_plan``): decoding's batches.
PLANNED_BATCH = 16


@functools.cache
def _kernels():
    try:
        return importlib.import_module("anybit.kernels")
    except ImportError:
        return None


class AnybitLinear(nn.Module):
    def __init__(self, spec: LinearSpec, device=None, dtype=None):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self._layer_id = compiled.register(self)
        self.register_parameter("bias", None)
        for name, (shape, stored_dtype) in spec.tensor_specs().items():
            empty = torch.empty(shape, dtype=stored_dtype or dtype, device=device)
            if name == "bias":
                self.bias = nn.Parameter(empty, requires_grad=False)
            else:
                self.register_buffer(name, empty)

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None = None) -> AnybitLinear:
        spec, tensors = pack_weight(q)
        module = cls(replace(spec, bias=bias is not None), dtype=None if bias is None else bias.dtype)
        for name, tensor in tensors.items():
            setattr(module, name, tensor)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().cpu().clone(), requires_grad=False)
        return module

    @classmethod
    def stacked(cls, linears: Sequence[AnybitLinear]) -> AnybitLinear:
        """One module whose outputs are the linears' outputs in turn, for linears that read the same
        input (q/k/v, gate/up): one kernel call for all of them, so one set of per-call costs
        (``qweight.stack_rows`` says what must match). On the first linear's device."""
        biases = [m.bias for m in linears]
        bias = None
        if any(b is not None for b in biases):
            like = next(b for b in biases if b is not None)
            bias = torch.cat([b if b is not None else like.new_zeros(m.out_features) for b, m in zip(biases, linears)])
        device = next(linears[0].buffers()).device
        return cls.from_quantized(stack_rows([m.to_quantized() for m in linears]), bias).to(device)

    def packed(self) -> dict[str, torch.Tensor]:
        """The packed tensors as stored (checkpoint layout), codes in the stored order."""
        codes = {codes_name(bits): bits for bits in self.spec.blocks}
        return {name: self.codes(codes[name]) if name in codes else self._buffers[name]
                for name in self.spec.tensor_specs() if name != "bias"}

    def codes(self, bits: int) -> torch.Tensor:
        """Width block ``bits``'s codes in the stored order (untiled when only the tiled copy is kept)."""
        stored = self._buffers.get(codes_name(bits))
        if stored is not None:
            return stored
        rows = getattr(self, lut_name(bits)).shape[0]
        if TILED_CODES.format(bits) in self._buffers:
            return untile_codes(self._buffers[TILED_CODES.format(bits)], bits, rows, -(-self.in_features // 32))
        return transpose_packed(self._buffers[ROW_CODES.format(bits)], bits, rows)

    def kernel_order_widths(self) -> list[int]:
        """The width blocks whose codes are kept in a kernel's order only (``keep_tiled_codes``,
        ``keep_row_codes``)."""
        return [bits for bits in self.spec.blocks if self._buffers.get(codes_name(bits)) is None]

    def keep_tiled_codes(self) -> None:
        """Keep the codes of the blocks of up to 4 bits in the tensor-core kernels' tiled order
        (``anybit.kernels.tiling``) instead of the stored order, with their subset coefficients:
        still one copy of the codes (padded to whole tiles), which the binary tensor-core and
        fragment kernels read as they are. ``state_dict`` and ``packed`` give the stored order back;
        ``AnybitLinear`` does this itself on the first GPU forward where ``tiled_codes_supported``."""
        from anybit.kernels import triton_bmma

        if not self.spec.row_codebooks:
            return
        for bits in self.spec.blocks:
            codes = self._buffers.get(codes_name(bits))
            if bits > triton_bmma.MAX_BITS or codes is None:
                continue
            coef, tiled = triton_bmma.prepare_block(codes, getattr(self, lut_name(bits)), bits)
            self.register_buffer(TILED_CODES.format(bits), tiled, persistent=False)
            self.register_buffer(SUBSET_COEF.format(bits), coef, persistent=False)
            self._buffers[codes_name(bits)] = None  # the stored order lives on in the tiled copy only
        self._kernel_operands = None

    def keep_row_codes(self) -> None:
        """Per-column codebooks: keep each block's codes packed along its columns (a row of W a row of
        words, as ``triton_grid`` reads them) instead of the stored order (along the outputs): still one
        copy. ``state_dict`` and ``packed`` give the stored order back; ``AnybitLinear`` does this itself
        on the first forward where ``triton_grid`` runs."""
        if not self.spec.column_codebooks:
            return
        for bits in self.spec.blocks:
            codes = self._buffers.get(codes_name(bits))
            if codes is None:
                continue
            rows = transpose_packed(codes, bits, self.out_features)
            self.register_buffer(ROW_CODES.format(bits), rows, persistent=False)
            self._buffers[codes_name(bits)] = None
        self._kernel_operands = None

    def keep_stored_codes(self) -> None:
        """Undo ``keep_tiled_codes`` and ``keep_row_codes``: every block's codes in the stored order again."""
        for bits in self.kernel_order_widths():
            self._buffers[codes_name(bits)] = self.codes(bits)
            kept = {TILED_CODES.format(bits), SUBSET_COEF.format(bits), ROW_CODES.format(bits)}
            for name in kept & set(self._buffers):
                del self._buffers[name]
            self._non_persistent_buffers_set -= kept
        self._kernel_operands = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for bits in self.kernel_order_widths():  # the checkpoint holds the stored order
            codes = self.codes(bits)
            destination[prefix + codes_name(bits)] = codes if keep_vars else codes.detach()

    def to_quantized(self) -> QuantizedWeight:
        return unpack_weight(self.spec, self.packed())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.to_quantized().dequantize(dtype)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._layer_id = compiled.register(self)  # a copy (deepcopy, unpickling) is another layer for the op

    def _apply(self, fn, recurse=True):
        # Packed tensors keep their storage dtype whatever the model is cast to (model.half(),
        # .to(torch.float32)): follow device moves only, so casting neither grows nor rounds them.
        stored = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, tensor in stored.items():
            moved = self._buffers[name]
            if tensor is not None and moved.dtype != tensor.dtype:
                self._buffers[name] = tensor.to(moved.device)
        return self

    def member_widths(self) -> torch.Tensor:
        """Width of each row (lut axis 0) or column (lut axis 1, affine): what blocks are made of."""
        widths = unit_widths(self.spec, {name: t for name, t in self._buffers.items() if t is not None})
        if self.spec.grid == "affine":
            return affine_column_widths(widths, self.spec.group_columns, self.in_features)
        return widths

    def block_members(self, bits: int) -> torch.Tensor | None:
        """The rows or stored columns of width block ``bits``, ascending; None for a single block."""
        if len(self.spec.blocks) == 1:
            return None
        return (self.member_widths() == bits).nonzero().squeeze(1)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        kernels = _kernels() if x.is_cuda else None
        if kernels is None:
            return False
        if self.spec.row_codebooks:
            return kernels.use_triton(x)
        return self._grid_mode(x) is not None

    def _grid_mode(self, x: torch.Tensor) -> int | None:
        """``kernels.grid_mode`` of this linear for x (affine grids, per-column codebooks)."""
        return _kernels().grid_mode(self.spec.grid, self.spec.lut_axis, self.spec.group_size, x)

    def _load_from_state_dict(self, *args, **kwargs):
        self.keep_stored_codes()  # the checkpoint's layout, loaded in place; tiled again on the next GPU forward
        self._kernel_operands = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _buffers_key(self) -> tuple:
        return tuple((name, t.data_ptr(), t.device) for name, t in self._buffers.items() if t is not None)

    def kernel_operands(self, device: torch.device | None = None) -> dict:
        """What the GPU kernels read, worked out once per set of buffers (cached: the forward of a
        decoding step must not synchronise, so that it can be captured in a CUDA graph). On a
        ``device`` where ``tiled_codes_supported``, first ``keep_tiled_codes``. The kernel takes x
        in stored column order, unscaled: the input scale is applied inside it, and the outlier
        columns are renumbered to the stored order."""
        cached = getattr(self, "_kernel_operands", None)
        if cached is not None and cached[0] == self._buffers_key():
            return cached[1]
        spec = self.spec
        if not spec.row_codebooks:
            if device is not None and _kernels().triton_runs_on(torch.device(device)):
                self.keep_row_codes()
            operands = self._grid_operands()
            self._kernel_operands = (self._buffers_key(), operands)
            return operands
        if device is not None and _kernels().tiled_codes_supported(device):
            self.keep_tiled_codes()
        perm = self.perm.long() if spec.perm else None
        blocks = []
        for bits in spec.blocks:
            tiled = self._buffers.get(TILED_CODES.format(bits))
            prepared = None if tiled is None else (self._buffers[SUBSET_COEF.format(bits)], tiled)
            blocks.append((self._buffers[codes_name(bits)], getattr(self, lut_name(bits)), bits,
                           self.block_members(bits), prepared))
        scale = self.input_scale if spec.input_scale else None
        outliers = None
        if spec.outliers:
            indptr, cols, delta = self._outlier_corrections()
            stored = torch.argsort(perm)[cols] if perm is not None else cols
            outliers = (indptr, stored.int(), delta)
        operands = dict(perm=perm, blocks=blocks, outliers=outliers, plans={},
                        input_scale=None if scale is None else (scale[perm] if perm is not None else scale))
        self._kernel_operands = (self._buffers_key(), operands)
        return operands

    def _outlier_corrections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CSR (indptr, original columns, values) of x's corrections for the outliers: they replace
        weights, so a kernel that computed with the quantized weight adds x times (outlier - weight)."""
        rows, cols = outlier_rows_cols(self.outlier_indptr, self.outlier_indices)
        return self.outlier_indptr.int(), cols, self.outlier_values.float() - self.weight_at(rows, cols)

    def _grid_operands(self) -> dict:
        """``kernel_operands`` of an affine or per-column-codebook linear: ``triton_grid.GridBlock``s
        reading x in its original column order (each block's columns through one index: the
        permutation and the block's membership), the input scale's fp32 reciprocals in that order, the
        outliers' CSR."""
        from anybit.kernels.triton_grid import GridBlock

        spec = self.spec
        perm = self.perm.long() if spec.perm else None
        affine = spec.grid == "affine"
        blocks = []
        for bits, shape in spec.blocks.items():
            members = self.block_members(bits)
            index = members if perm is None else (perm if members is None else perm[members])
            values = getattr(self, scales_name(bits) if affine else lut_name(bits))
            rows = self._buffers.get(ROW_CODES.format(bits))
            if rows is None:
                rows = self.codes(bits) if affine else transpose_packed(self.codes(bits), bits, spec.out_features)
            blocks.append(GridBlock(rows.contiguous(), values.contiguous(),
                                    getattr(self, zeros_name(bits)).contiguous() if affine else None, bits,
                                    shape[1] if affine else shape[0],
                                    None if index is None else index.int().contiguous(),
                                    spec.group_size if affine else 0))
        outliers = None
        if spec.outliers:
            indptr, cols, delta = self._outlier_corrections()
            outliers = (indptr, cols.int(), delta)
        return dict(blocks=blocks, outliers=outliers,
                    inv_input_scale=1.0 / self.input_scale.float() if spec.input_scale else None)

    def forward(self, x: torch.Tensor, planes=None) -> torch.Tensor:
        """``planes``: ``anybit.kernels.xplanes``' planes of x, when the op that made x wrote them too
        (``add_rms_norm_planes``, ``silu_mul_planes``): the binary tensor-core kernel reads them and
        spends no launch on x. Used only where the kernel reads x as given (no column permutation or
        input scale in the spec); elsewhere ignored. Under ``torch.compile`` the call is one opaque op
        (``anybit.nn.compiled``), which makes x's planes itself."""
        if torch.compiler.is_compiling():
            return compiled.linear(x, self._layer_id)
        return self.eager_forward(x, planes)

    def eager_forward(self, x: torch.Tensor, planes=None) -> torch.Tensor:
        """``forward`` outside ``torch.compile``."""
        if not self.uses_kernel(x):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return nn.functional.linear(x, self.dequantize(torch.float32).to(x.dtype), bias)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, expected {self.in_features}")
        ops = self.kernel_operands(x.device)
        if not self.spec.row_codebooks:  # uses_kernel: triton_grid serves the call
            y = torch.empty(x.shape[:-1] + (self.out_features,), dtype=x.dtype, device=x.device)
            _kernels().grid_linear(x.reshape(-1, self.in_features), ops["blocks"], y.view(-1, self.out_features),
                                   inv_input_scale=ops["inv_input_scale"], outliers=ops["outliers"])
            return y if self.bias is None else y + self.bias.to(y.dtype)
        xs = x[..., ops["perm"]] if ops["perm"] is not None else x
        if ops["perm"] is not None or ops["input_scale"] is not None:
            planes = None
        x2 = xs.reshape(-1, self.in_features)
        plan = self._launch_plan(ops, x2)
        if plan is not None:
            y = torch.empty(x.shape[:-1] + (self.out_features,), dtype=x.dtype, device=x.device)
            plan(x2, y.view(-1, self.out_features), planes)
        else:
            y = _kernels().lut_linear_blocks(xs, ops["blocks"], self.out_features, input_scale=ops["input_scale"],
                                             outliers=ops["outliers"], planes=planes)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _launch_plan(self, ops: dict, x2: torch.Tensor):
        """``kernels.plan_linear_blocks`` for x2's rows and dtype, made on the first call of each and kept
        with the kernel operands (dropped with them): the launch decisions of a decoding step's calls,
        made once (None where there is no plan: then ``lut_linear_blocks`` decides per call). Batches of
        up to PLANNED_BATCH rows only, so that prompts of every length do not each keep one."""
        batch = x2.shape[0]
        if batch > PLANNED_BATCH:
            return None
        plans = ops["plans"]
        key = (batch, x2.dtype)
        if key not in plans:
            plans[key] = _kernels().plan_linear_blocks(ops["blocks"], self.in_features, batch, x2.dtype, x2.device,
                                                       input_scale=ops["input_scale"], outliers=ops["outliers"])
        return plans[key]

    def weight_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The de-quantized weight (outliers not applied) at original positions (rows[i], cols[i]), fp32."""
        spec = self.spec
        stored = torch.argsort(self.perm.long())[cols] if spec.perm else cols
        member, along = (rows, stored) if spec.row_codebooks else (stored, rows)
        widths = self.member_widths()
        slot = torch.empty(widths.numel(), dtype=torch.long, device=widths.device)  # index inside its block
        values = torch.empty(rows.numel(), dtype=torch.float32, device=rows.device)
        for bits in spec.blocks:
            in_block = widths == bits
            slot[in_block] = torch.arange(int(in_block.sum()), device=slot.device)
            hit = widths[member] == bits
            s, a, words = slot[member[hit]], along[hit], self.codes(bits)
            if spec.grid == "lut":
                values[hit] = getattr(self, lut_name(bits)).float()[s, reference.codes_at(words, bits, s, a)]
            else:
                group = s // spec.group_columns
                code = reference.codes_at(words, bits, a, s).float()
                scale, zero = getattr(self, scales_name(bits))[a, group], getattr(self, zeros_name(bits))[a, group]
                values[hit] = scale.float() * (code - zero.float())
        return values / self.input_scale.float()[cols] if spec.input_scale else values

    def extra_repr(self) -> str:
        widths = ",".join(str(b) for b in sorted(self.spec.blocks))
        return (f"in_features={self.in_features}, out_features={self.out_features}, grid={self.spec.grid}, "
                f"widths={widths}, bias={self.bias is not None}")
