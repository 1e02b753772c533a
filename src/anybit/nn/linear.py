"""``AnybitLinear``: a linear layer that keeps its weight packed (docs/format.md) and computes with it.

The packed tensors are buffers named as in the checkpoint, so ``state_dict`` is the on-disk
layout. Forward, where a GPU kernel exists for the grid (per-row codebooks on CUDA): scale and
permute the input once, multiply it by each width block (``block_matmul``, the step the kernel
replaces), put the blocks' outputs together, then add the sparse outliers' correction and the
bias; the weight is never decoded as a whole. Everywhere else the pure-torch path decodes the
weight (unpack + codebook lookup) for the one matmul and drops it: the same dense product the
in-memory quantized model computes, so a saved-and-loaded model gives identical logits.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import replace

import torch
from torch import nn

from anybit.formats.packed import (
    LinearSpec, affine_column_widths, codes_name, lut_name, outlier_rows_cols, pack_weight, scales_name,
    unit_widths, unpack_weight, zeros_name,
)
from anybit.nn import reference
from anybit.quant.qweight import QuantizedWeight


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

    def packed(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def to_quantized(self) -> QuantizedWeight:
        return unpack_weight(self.spec, self.packed())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.to_quantized().dequantize(dtype)

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
        widths = unit_widths(self.spec, self.packed())
        if self.spec.grid == "affine":
            return affine_column_widths(widths, self.spec.group_columns, self.in_features)
        return widths

    def block_members(self, bits: int) -> torch.Tensor | None:
        """The rows or stored columns of width block ``bits``, ascending; None for a single block."""
        if len(self.spec.blocks) == 1:
            return None
        return (self.member_widths() == bits).nonzero().squeeze(1)

    def block_matmul(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        """The output rows of width block ``bits`` for ``x`` (already scaled and permuted), by the
        GPU kernel."""
        return _kernels().lut_linear(x, getattr(self, codes_name(bits)), getattr(self, lut_name(bits)), bits,
                                     self.in_features)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        kernels = _kernels() if x.is_cuda else None
        return (kernels is not None and self.spec.grid == "lut" and self.spec.lut_axis == 0
                and kernels.use_triton(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel(x):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return nn.functional.linear(x, self.dequantize(torch.float32).to(x.dtype), bias)
        spec = self.spec
        xs = x / self.input_scale.to(x.dtype) if spec.input_scale else x
        if spec.perm:
            xs = xs[..., self.perm.long()]
        outputs = [self.block_matmul(xs, bits) for bits in spec.blocks]
        y = torch.cat(outputs, -1)
        if len(outputs) > 1:  # blocks hold rows in width order; put them back
            order = torch.cat([self.block_members(bits) for bits in spec.blocks])
            y = y[..., torch.argsort(order)]
        if spec.outliers:
            y = y + self.outlier_correction(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def outlier_correction(self, x: torch.Tensor) -> torch.Tensor:
        """x times (outlier value - quantized weight) at the outliers' positions: outliers replace weights."""
        rows, cols = outlier_rows_cols(self.outlier_indptr, self.outlier_indices)
        delta = (self.outlier_values.float() - self.weight_at(rows, cols)).to(x.dtype)
        y = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        return y.index_add(-1, rows, x[..., cols] * delta)

    def weight_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The de-quantized weight (outliers not applied) at original positions (rows[i], cols[i]), fp32."""
        spec = self.spec
        stored = torch.argsort(self.perm.long())[cols] if spec.perm else cols
        member, along = (rows, stored) if spec.grid == "lut" and spec.lut_axis == 0 else (stored, rows)
        widths = self.member_widths()
        slot = torch.empty(widths.numel(), dtype=torch.long, device=widths.device)  # index inside its block
        values = torch.empty(rows.numel(), dtype=torch.float32, device=rows.device)
        for bits in spec.blocks:
            in_block = widths == bits
            slot[in_block] = torch.arange(int(in_block.sum()), device=slot.device)
            hit = widths[member] == bits
            s, a, words = slot[member[hit]], along[hit], getattr(self, codes_name(bits))
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
