import torch

from anybit.quant.uniform import dequantize_affine, minmax_params, quantize_affine, rtn_quantize


def test_minmax_grid_covers_rows_and_zero():
    w = torch.randn(16, 40) + 3.0  # all-positive rows: the grid must still contain 0
    scale, zero = minmax_params(w, 4)
    codes = quantize_affine(w, scale, zero, 4)
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.allclose(dequantize_affine(zero[:, None].expand(-1, 1), scale, zero), torch.zeros(16, 1))
    err = (dequantize_affine(codes, scale, zero) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-5).all()


def test_constant_row_does_not_divide_by_zero():
    scale, zero = minmax_params(torch.zeros(2, 8), 3)
    assert torch.isfinite(scale).all() and (scale > 0).all()


def test_groupwise_is_no_worse_than_per_channel():
    w = torch.randn(32, 256) * torch.linspace(0.1, 3, 256)
    for bits in (2, 3, 4):
        errs = []
        for g in (0, 64):
            codes, scales, zeros = rtn_quantize(w, bits, g)
            gs = g or 256
            deq = scales.repeat_interleave(gs, 1) * (codes - zeros.repeat_interleave(gs, 1))
            errs.append(((deq - w) ** 2).sum())
        assert errs[1] < errs[0]
        assert scales.shape == (32, 256 // 64)


def test_scales_are_fp16_exact():
    _, scales, _ = rtn_quantize(torch.randn(8, 100), 3, 0)
    assert torch.equal(scales, scales.half().float())
