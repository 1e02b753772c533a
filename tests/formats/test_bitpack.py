import pytest
import torch

from anybit.formats.bitpack import CHUNK, pack_bitplanes, packed_words, unpack_bitplanes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 32), (2, 33), (7, 100), (4, 257)])
def test_round_trip_every_width_and_odd_shapes(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)
    words = pack_bitplanes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (shape[0], packed_words(shape[1], bits))
    assert torch.equal(unpack_bitplanes(words, bits, shape[1]), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_is_bit_planes_of_32_columns(bits):
    """Word chunk * bits + p holds bit p of the chunk's 32 codes, column 32 * chunk + i at bit i;
    columns past the end are padded with code 0."""
    g = torch.Generator().manual_seed(bits)
    cols = 2 * CHUNK + 5
    codes = torch.randint(0, 2**bits, (2, cols), generator=g, dtype=torch.uint8)
    words = pack_bitplanes(codes, bits).long() & 0xFFFFFFFF
    padded = torch.zeros(2, 3 * CHUNK, dtype=torch.long)
    padded[:, :cols] = codes.long()
    for chunk in range(3):
        for p in range(bits):
            bit_p = (padded[:, chunk * CHUNK : (chunk + 1) * CHUNK] >> p) & 1
            expected = (bit_p << torch.arange(CHUNK)).sum(1)
            assert torch.equal(words[:, chunk * bits + p], expected)


def test_all_ones_fill_the_sign_bit():
    words = pack_bitplanes(torch.full((1, CHUNK), 255, dtype=torch.uint8), 8)
    assert (words == -1).all()
    assert (unpack_bitplanes(words, 8, CHUNK) == 255).all()


@pytest.mark.parametrize("bits", [0, 9])
def test_width_out_of_range(bits):
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        pack_bitplanes(torch.zeros(1, 4, dtype=torch.uint8), bits)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_rows_in_parts_pack_and_unpack_as_one(bits, monkeypatch):
    """Large matrices go through in parts of rows (PART_CODES codes each): the words and codes
    are those of the whole matrix at once, whatever the part size."""
    from anybit.formats import bitpack

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (11, 70), generator=g, dtype=torch.uint8)
    whole = pack_bitplanes(codes, bits)
    # 70 columns are 96 codes a row (bits x 96 values a row when packing): from one row a part to two
    for part_codes in (1, 96, 200):
        monkeypatch.setattr(bitpack, "PART_CODES", part_codes)
        assert torch.equal(pack_bitplanes(codes, bits), whole)
        assert torch.equal(unpack_bitplanes(whole, bits, 70), codes)
