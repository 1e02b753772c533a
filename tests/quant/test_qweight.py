import pytest
import torch

from anybit.quant.qweight import Outliers, QuantizedWeight, stack_rows
from tests.formats.random_qweights import random_affine, random_lut, with_extras


def _affine(out=4, cols=10, bits=3, group=0, perm=None):
    n_groups = -(-cols // group) if group else 1
    codes = torch.randint(0, 2**bits, (out, cols), dtype=torch.uint8)
    scales = torch.rand(out, n_groups).half()
    zeros = torch.randint(0, 2**bits, (out, n_groups)).half()
    return QuantizedWeight(out, cols, codes, torch.full((n_groups,), bits), scales=scales, zeros=zeros,
                           group_size=group, perm=perm)


def test_affine_dequantize_by_hand():
    q = _affine(group=4)
    w = q.dequantize()
    for j in range(10):
        g = j // 4
        assert torch.allclose(w[:, j], q.scales[:, g].float() * (q.codes[:, j].float() - q.zeros[:, g].float()))


def test_honest_bits_per_channel_and_group():
    q = _affine(out=8, cols=576, bits=4)
    assert q.total_bits() == 8 * 576 * 4 + 8 * 32
    assert abs(q.bits_per_weight() - (4 + 32 / 576)) < 1e-9
    g = _affine(out=8, cols=512, bits=3, group=128)
    assert g.bits_per_weight() == 3.25
    assert g.index_bits_per_weight() == 3.0


def test_lut_rows_and_columns():
    codes = torch.tensor([[0, 1, 2], [3, 0, 1]], dtype=torch.uint8)
    lut = torch.arange(12, dtype=torch.float16).view(3, 4)
    by_col = QuantizedWeight(2, 3, codes, torch.tensor([2, 2, 2]), lut=lut, lut_axis=1)
    assert by_col.dequantize().tolist() == [[0, 5, 10], [3, 4, 9]]
    by_row = QuantizedWeight(2, 3, codes, torch.tensor([2, 1]), lut=lut[:2], lut_axis=0)
    assert by_row.dequantize().tolist() == [[0, 1, 2], [7, 4, 5]]
    # mixed widths: codes 2*3*2 + 1*3, codebooks 16*(4+2), widths 8 per row; rows of 3 codes are
    # packed 32 at a time, so each row stores 29 codes of padding at its width: (2 + 1) * 29
    assert by_row.storage_bits() == {"codes": 9, "padding": 87, "codebooks": 96, "widths": 16}


def test_perm_input_scale_and_outliers():
    perm = torch.tensor([2, 0, 1])
    q = QuantizedWeight(1, 3, torch.tensor([[0, 1, 2]], dtype=torch.uint8), torch.tensor([2]),
                        lut=torch.tensor([[10.0, 20.0, 30.0, 40.0]]).half(), perm=perm,
                        input_scale=torch.tensor([1.0, 2.0, 4.0]).half(),
                        outliers=Outliers(torch.tensor([0]), torch.tensor([-7.0]).half()))
    # stored column k is original column perm[k]: original [20, 30, 10] / [1, 2, 4], then outlier at 0
    assert q.dequantize().tolist() == [[-7.0, 15.0, 2.5]]
    parts = q.storage_bits()
    assert parts["perm"] == 3 * 16 and parts["input_scale"] == 3 * 16
    assert parts["outliers"] == 1 * (16 + 16) + 2 * 32


def _sharing_input(weights):
    """The weights with the first one's perm and input scale (what linears of one input share)."""
    for w in weights[1:]:
        w.perm, w.input_scale = weights[0].perm, weights[0].input_scale
    return weights


@pytest.mark.parametrize("make", [lambda s: random_lut(5 + s, 45, 0, seed=s),
                                  lambda s: random_affine(5 + s, 45, 8, seed=0)])  # equal group widths
def test_stack_rows_is_the_weights_one_above_the_other(make):
    weights = _sharing_input([with_extras(make(s), seed=s, outliers=3 * s) for s in range(3)])
    stacked = stack_rows(weights)
    assert stacked.out_features == sum(w.out_features for w in weights)
    assert torch.equal(stacked.dequantize(), torch.cat([w.dequantize() for w in weights]))
    assert stacked.total_bits() >= sum(w.code_bits() for w in weights)


def test_stack_rows_refuses_weights_that_do_not_share_the_input_side():
    a, b = with_extras(random_lut(4, 45, 0, seed=1), seed=1), with_extras(random_lut(4, 45, 0, seed=2), seed=2)
    with pytest.raises(ValueError, match="perm"):
        stack_rows([a, b])
    with pytest.raises(ValueError, match="lut_axis 1"):
        stack_rows([random_lut(4, 45, 1, seed=1), random_lut(4, 45, 1, seed=2)])
    with pytest.raises(ValueError, match="group widths"):
        stack_rows([random_affine(4, 45, 8, seed=1), random_affine(4, 45, 8, seed=2)])
    with pytest.raises(ValueError, match="input features"):
        stack_rows([random_lut(4, 45, 0, seed=1), random_lut(4, 46, 0, seed=1)])
