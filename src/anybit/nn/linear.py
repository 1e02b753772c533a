"""``AnybitLinear``: a linear layer that keeps its weight packed (docs/format.md) and computes with it.

The packed tensors are buffers named as in the checkpoint, so ``state_dict`` is the on-disk
layout. Forward, where a GPU kernel exists for the grid (per-row codebooks on CUDA): permute the
input once, then the kernels write every width block's rows straight into the output (input
scale applied inside; at batch 1 one launch for up to three blocks), and one more launch adds
the sparse outliers' correction; the weight is never decoded as a whole. Everywhere else the
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

from anybit.formats.packed import (
    LinearSpec, affine_column_widths, codes_name, lut_name, outlier_rows_cols, pack_weight, scales_name,
    unit_widths, unpack_weight, zeros_name,
)
from anybit.nn import reference
from anybit.quant.qweight import QuantizedWeight, stack_rows


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
        device = next(iter(linears[0].packed().values())).device
        return cls.from_quantized(stack_rows([m.to_quantized() for m in linears]), bias).to(device)

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

    def uses_kernel(self, x: torch.Tensor) -> bool:
        kernels = _kernels() if x.is_cuda else None
        return (kernels is not None and self.spec.grid == "lut" and self.spec.lut_axis == 0
                and kernels.use_triton(x))

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_operands = None  # loaded in place: same storage, new values
        return super()._load_from_state_dict(*args, **kwargs)

    def kernel_operands(self) -> dict:
        """What the GPU kernels read, worked out once per set of buffers and ``ANYBIT_KERNELS=bmma``
        setting (cached: the forward of a decoding step must not synchronise, so that it can be
        captured in a CUDA graph). The kernel takes x in stored column order, unscaled: the input
        scale is applied inside it, and the outlier columns are renumbered to the stored order."""
        bmma = _kernels().bmma_requested()
        key = (bmma, *((t.data_ptr(), t.device) for t in self._buffers.values() if t is not None))
        cached = getattr(self, "_kernel_operands", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        spec = self.spec
        perm = self.perm.long() if spec.perm else None
        blocks = [(getattr(self, codes_name(bits)), getattr(self, lut_name(bits)), bits, self.block_members(bits))
                  for bits in spec.blocks]
        if bmma:
            from anybit.kernels import triton_bmma

            blocks = [b + ((triton_bmma.prepare_block(*b[:3]),) if b[2] <= triton_bmma.MAX_BITS else ())
                      for b in blocks]
        scale = self.input_scale if spec.input_scale else None
        outliers = None
        if spec.outliers:
            rows, cols = outlier_rows_cols(self.outlier_indptr, self.outlier_indices)
            # Outliers replace weights: add x times (outlier - quantized weight) at their positions.
            delta = self.outlier_values.float() - self.weight_at(rows, cols)
            stored = torch.argsort(perm)[cols] if perm is not None else cols
            outliers = (self.outlier_indptr.int(), stored.int(), delta)
        operands = dict(perm=perm, blocks=blocks, outliers=outliers,
                        input_scale=None if scale is None else (scale[perm] if perm is not None else scale))
        self._kernel_operands = (key, operands)
        return operands

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel(x):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return nn.functional.linear(x, self.dequantize(torch.float32).to(x.dtype), bias)
        ops = self.kernel_operands()
        xs = x[..., ops["perm"]] if ops["perm"] is not None else x
        y = _kernels().lut_linear_blocks(xs, ops["blocks"], self.out_features, input_scale=ops["input_scale"],
                                         outliers=ops["outliers"])
        return y if self.bias is None else y + self.bias.to(y.dtype)

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
