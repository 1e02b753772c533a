"""The tiled order of a block's codes (anybit.kernels.tiling): where each word goes, and back."""

import torch

from anybit.formats.bitpack import pack_bitplanes
from anybit.kernels import tiling


def test_tile_codes_puts_each_word_where_the_kernel_reads_it():
    gen = torch.Generator().manual_seed(0)
    rows, cols, bits = 70, 300, 3
    packed = pack_bitplanes(torch.randint(0, 2**bits, (rows, cols), generator=gen), bits)
    tiled = tiling.tile_codes(packed, bits)
    kt = 2  # 10 chunks -> 2 mma tiles of 8
    assert tiling.tile_shape(rows, 10) == (128 // 16, kt)  # rows padded to 128
    assert tiled.numel() == 128 * bits * kt * 8
    for r, ch, p in [(0, 0, 0), (17, 9, 1), (69, 9, 2), (33, 4, 0)]:
        idx = (((r // 16) * kt + ch // 8) * bits + p) * 128 + 16 * ((r % 16) // 2) + 2 * (ch % 8) + r % 2
        assert tiled[idx].item() == packed[r, ch * bits + p].item()
    assert int((tiled != 0).sum()) == int((packed != 0).sum())  # the rest is zero padding


def test_untile_codes_inverts_tile_codes():
    gen = torch.Generator().manual_seed(1)
    for rows, nchunk, bits in [(70, 10, 3), (64, 8, 1), (1, 1, 4), (211, 35, 2)]:
        codes = torch.randint(-2**31, 2**31 - 1, (rows, nchunk * bits), generator=gen, dtype=torch.int32)
        assert torch.equal(tiling.untile_codes(tiling.tile_codes(codes, bits), bits, rows, nchunk), codes)


def test_stored_codes_of_a_block_kept_only_tiled():
    codes = pack_bitplanes(torch.randint(0, 4, (20, 70)), 2)
    lut = torch.zeros(20, 4)
    tiled = tiling.tile_codes(codes, 2)
    assert tiling.stored_codes((codes, lut, 2, None), 70) is codes
    assert torch.equal(tiling.stored_codes((None, lut, 2, None, (None, tiled)), 70), codes)
