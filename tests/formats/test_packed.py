import pytest
import torch

from anybit.errors import AnybitError
from anybit.formats.packed import LinearSpec, pack_weight, unpack_weight
from tests.formats.random_qweights import all_kinds, random_affine, random_lut

KINDS = all_kinds()


def _stored_bits(tensors):
    return sum(t.numel() * t.element_size() * 8 for t in tensors.values())


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_keeps_every_field(kind):
    q = KINDS[kind]
    spec, tensors = pack_weight(q)
    back = unpack_weight(spec, tensors)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.bits, q.bits.int())
    assert torch.equal(back.dequantize(), q.dequantize())
    for name in ("perm", "input_scale"):
        assert (getattr(back, name) is None) == (getattr(q, name) is None)
    if q.outliers is not None and q.outliers.positions.numel():
        assert torch.equal(back.outliers.positions, q.outliers.positions)


@pytest.mark.parametrize("kind", KINDS)
def test_stored_bits_are_the_honest_accounting(kind):
    q = KINDS[kind]
    spec, tensors = pack_weight(q)
    assert _stored_bits(tensors) == q.total_bits()
    assert {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()} == spec.tensor_specs()


def test_units_of_one_width_keep_their_order_and_no_permutation_is_stored():
    q = random_lut(6, 32, 0, seed=3)
    q.bits = torch.tensor([2, 1, 2, 1, 2, 1], dtype=torch.int32)
    q.codes = q.codes % 2
    spec, tensors = pack_weight(q)
    assert spec.blocks == {1: (3, 32), 2: (3, 32)}
    assert torch.equal(tensors["lut_1bit"], q.lut[[1, 3, 5], :2])  # rows 1, 3, 5: a stable sort of the widths
    assert set(tensors) == {"codes_1bit", "lut_1bit", "codes_2bit", "lut_2bit", "widths"}


def test_affine_short_last_group_stays_last_in_its_block():
    q = random_affine(4, 70, 32, seed=1)  # groups of 32, 32, 6
    q.bits = torch.tensor([3, 5, 3], dtype=torch.int32)
    q.codes = q.codes % 8
    spec, tensors = pack_weight(q)
    assert spec.blocks == {3: (4, 38), 5: (4, 32)} and tensors["scales_3bit"].shape == (4, 2)
    assert torch.equal(unpack_weight(spec, tensors).dequantize(), q.dequantize())


def test_outliers_are_stored_as_csr_with_small_indices():
    q = all_kinds()["lut-rows"]
    _, tensors = pack_weight(q)
    indptr, indices = tensors["outlier_indptr"], tensors["outlier_indices"]
    assert indptr.dtype == torch.int32 and indices.dtype == torch.int16 and tensors["perm"].dtype == torch.int16
    rows = torch.repeat_interleave(torch.arange(q.out_features), torch.diff(indptr.long()))
    assert torch.equal(rows * q.in_features + indices.long(), q.outliers.positions)


@pytest.mark.parametrize("kind", KINDS)
def test_spec_json_round_trip(kind):
    spec, _ = pack_weight(KINDS[kind])
    assert LinearSpec.from_json(spec.to_json(), "here") == spec


@pytest.mark.parametrize("change,message", [
    ({"grid": "vq"}, "grid 'vq'"),
    ({"blocks": {"9": [37, 45]}}, r"blocks\['9'\]"),
    ({"blocks": {"3": [36, 45]}}, "do not split"),
    ({"out_features": "37"}, "out_features is missing or not an integer"),
    ({"colour": 1}, "unknown field 'colour'"),
])
def test_spec_json_errors_name_the_field(change, message):
    data = pack_weight(KINDS["lut-uniform"])[0].to_json() | change
    with pytest.raises(AnybitError, match=message):
        LinearSpec.from_json(data, "modules['x']")
