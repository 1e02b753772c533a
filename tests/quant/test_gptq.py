import torch

from anybit.quant.gptq import act_order_permutation, gptq_quantize
from anybit.quant.uniform import AffineColumnQuantizer, rtn_quantize
from tests.conftest import correlated_inputs


def layer_error(w, q, h):
    d = w - q
    return float(torch.einsum("ij,jk,ik->", d, h, d))


def _gptq(w, h, bits, group, perm=None):
    cols = w.shape[1]
    n_groups = -(-cols // group) if group else 1
    grid = AffineColumnQuantizer(w.shape[0], cols, torch.full((n_groups,), bits), group)
    q = gptq_quantize(w, h, grid, blocksize=32, perm=perm)
    return q, grid


def test_gptq_beats_rtn_on_layer_output():
    x = correlated_inputs(2048, 96)
    h = x.t() @ x / x.shape[0]
    w = torch.randn(48, 96)
    for bits in (2, 3, 4):
        for group in (0, 32):
            q, _ = _gptq(w, h, bits, group)
            codes, scales, zeros = rtn_quantize(w, bits, group)
            gs = group or 96
            rtn = scales.repeat_interleave(gs, 1) * (codes - zeros.repeat_interleave(gs, 1))
            assert layer_error(w, q, h) < layer_error(w, rtn, h)


def test_recorded_codes_reproduce_output():
    x = correlated_inputs(1024, 64, seed=1)
    h = x.t() @ x / x.shape[0]
    w = torch.randn(16, 64)
    perm = act_order_permutation(h)
    q, grid = _gptq(w, h, 3, 16, perm)
    g = 16
    deq = grid.scales.repeat_interleave(g, 1) * (grid.codes.float() - grid.zeros.repeat_interleave(g, 1))
    assert torch.allclose(deq[:, torch.argsort(perm)], q, atol=1e-6)
    assert int(grid.codes.max()) <= 7


def test_act_order_processes_loud_columns_first():
    h = torch.diag(torch.tensor([1.0, 5.0, 3.0]))
    assert act_order_permutation(h).tolist() == [1, 2, 0]


def test_dead_columns_are_zeroed():
    x = correlated_inputs(512, 32, seed=2)
    x[:, 5] = 0
    h = x.t() @ x / x.shape[0]
    q, _ = _gptq(torch.randn(8, 32), h, 4, 0)
    # A column no input ever excites is set to 0, which the min-max grid holds exactly.
    assert torch.equal(q[:, 5], torch.zeros(8))
