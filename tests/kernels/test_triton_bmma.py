"""Binary tensor-core LUT kernel (anybit.kernels.triton_bmma): its operands (subset coefficients,
tiled codes), the x bit planes (Triton, run under the interpreter in a subprocess) with the
kernel's arithmetic emulated in torch against the reference, and the Gluon kernel itself on CUDA
when there is a GPU (skipped otherwise)."""

from __future__ import annotations

import os

if __name__ == "__main__":  # the interpreter worker (see ``interpreted_errors``)
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from anybit.formats.bitpack import pack_bitplanes  # noqa: E402
from anybit.kernels import lut_linear_ref  # noqa: E402
from checks import rel_err  # noqa: E402
from interpreted import worker_results  # noqa: E402

pytest.importorskip("triton")
from anybit.kernels import triton_bmma as tb  # noqa: E402
from anybit.kernels import xplanes  # noqa: E402

TOL = 1e-3  # relative error, fp16


def block(rows, cols, bits, gen):
    codes = torch.randint(0, 2**bits, (rows, cols), generator=gen)
    lut = (torch.randn(rows, 2**bits, generator=gen) * 0.05).half()
    return codes, pack_bitplanes(codes, bits), lut


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_subset_coefficients_rebuild_every_entry(bits):
    gen = torch.Generator().manual_seed(bits)
    lut = torch.randn(5, 2**bits + 3, generator=gen).half()  # extra columns are ignored
    coef = tb.subset_coefficients(lut, bits).double()
    for q in range(2**bits):
        subsets = [t for t in range(2**bits) if t & q == t]
        assert torch.allclose(coef[:, subsets].sum(1), lut[:, q].double(), atol=1e-6)


def test_warps_split_k_only_for_small_grids():
    """K is split over a program's warps only while the launch stays small and every warp keeps
    >= 8 mma tiles; 4-bit blocks take 2 warps for their 16 masks, and a 3-bit partner the same."""
    assert tb.warps_for([(3, 28672)], 16, 1) == 1  # 1792 row tiles: one warp each
    assert tb.warps_for([(3, 4096)], 16, 1) == 2  # 256 tiles, 16 mma tiles: 2 x 8
    assert tb.warps_for([(3, 4096)], 43, 1) == 4
    assert tb.warps_for([(3, 4096)], 43, 4) == 1  # batch 4: enough programs already
    assert tb.warps_for([(3, 3072), (4, 1024)], 16, 1) == 4  # 3-bit: K over 4 warps, 4-bit: 2
    assert tb.warps_for([(3, 8256), (4, 2752)], 16, 1) == 2
    for ktiles in (1, 4, 16, 56, 157):
        assert 1 <= tb.warps_for([(2, 100)], ktiles, 1) <= tb.MAX_KSPLIT
        # a long row on few rows: the 3-bit block's K split (all the warps) stays within MAX_KSPLIT
        assert tb.warps_for([(4, 24), (3, 24)], ktiles, 1) <= tb.MAX_KSPLIT
    assert tb.warps_for([(4, 24), (3, 24)], 157, 1) == 8  # 4-bit: K over 4 warps, 3-bit: over 8


def test_two_block_launches_keep_more_copies_in_flight_on_long_rows_with_a_four_bit_block():
    assert tb.stages_for([3], 16, 1792) == tb.stages_for([4], 56, 512) == 4
    assert tb.stages_for([4, 3], 16, 1376) == 3  # 11008x4096 at 3.25 bits: 688 programs of 2 warps
    assert tb.stages_for([4, 3], 16, 512) == 4  # 4096x4096
    assert tb.stages_for([4, 3], 43, 1024) == tb.stages_for([4, 3], 43, 2048) == 5  # down projections
    assert tb.stages_for([3, 2], 16, 688) == tb.stages_for([3, 2], 56, 1024) == 4
    assert tb.stages_for([3, 2], 16, 1792) == 3  # 28672x4096 at 2.25 bits


def test_only_batch_one_launches_of_one_narrow_block_too_large_for_roomy_registers_take_two_tiles_a_program():
    roomy = tb.ROOMY_WARPS_PER_SM * tb._multiprocessors(None)
    assert tb.tiles_per_program([3], 1, roomy + 1) == tb.tiles_per_program([2], 1, 2 * roomy) == 2
    assert tb.tiles_per_program([3], 1, roomy) == 1  # fits ROOMY_REGISTERS as it is
    assert tb.tiles_per_program([3], 1, 2 * roomy + 1) == 1  # its half does not either
    assert tb.tiles_per_program([3], 2, roomy + 1) == 1
    assert tb.tiles_per_program([4], 1, roomy + 1) == tb.tiles_per_program([4, 3], 1, roomy + 1) == 1
    if roomy == 1584:  # 132 multiprocessors (an H100, or no GPU): 28672x4096 at 3 bits, 1792 programs of a warp
        assert tb.tiles_per_program([3], 1, 1792 * tb.warps_for([(3, 28672)], 16, 1)) == 2


def test_launches_that_take_no_more_waves_at_three_warps_a_scheduler_get_more_registers():
    sms = tb._multiprocessors(None)
    roomy, most = tb.ROOMY_WARPS_PER_SM * sms, tb.MAX_WARPS_PER_SM * sms  # one wave at 168 / 128 registers
    assert tb.registers_for(1, None) == tb.registers_for(roomy, None) == tb.ROOMY_REGISTERS
    assert tb.registers_for(roomy + 1, None) == tb.registers_for(most, None) == tb.MAX_REGISTERS  # 2 waves, not 1
    assert tb.registers_for(most + 1, None) == tb.registers_for(2 * roomy, None) == tb.ROOMY_REGISTERS  # 2 either way
    assert tb.registers_for(2 * roomy + 1, None) == tb.MAX_REGISTERS
    if sms == 132:  # 22016x4096 at 4 bits, batch 1: 1376 programs of 2 warps
        assert tb.registers_for(2752, None) == tb.ROOMY_REGISTERS


def test_binary_tensor_cores_serve_up_to_four_rows_of_x_below_four_bits_two_beside_the_fragment_kernel():
    from anybit.kernels import triton_lut

    def blocks(*widths_rows):
        return [(None, torch.zeros(rows, 2**bits), bits, None) for bits, rows in widths_rows]

    assert triton_lut.bmma_batch_limit(blocks((3, 300), (4, 100))) == 4  # 3.25 bits
    assert triton_lut.bmma_batch_limit(blocks((3, 100))) == 4
    assert triton_lut.bmma_batch_limit(blocks((4, 100))) == 3  # twice the masks: the dot kernel from 4 rows
    assert triton_lut.bmma_batch_limit(blocks((4, 100), (8, 50))) == 3  # wider blocks do not count
    # where the fragment kernel (triton_mma) serves the call it takes over from 3 rows
    assert triton_lut.bmma_batch_limit(blocks((3, 300), (4, 100)), fragments=True) == 2
    # the choice launch_blocks makes without a mode (x on the CPU: no fragment kernel): only blocks that come
    # with their prepared operands run on binary tensor cores
    prepared = [b + ((None, None),) for b in blocks((3, 300), (4, 100))]
    assert triton_lut.tensor_core_mode(torch.zeros(4, 64), prepared) == "bmma"
    assert triton_lut.tensor_core_mode(torch.zeros(5, 64), prepared) is None
    assert triton_lut.tensor_core_mode(torch.zeros(1, 64), blocks((3, 300), (4, 100))) is None


CASES = [  # (rows, cols, bits, batch, input_scale, x scale)
    (37, 300, 3, 2, False, 3.0), (20, 513, 4, 1, True, 1.0), (9, 64, 1, 3, False, 1e-3),
    (16, 1000, 2, 1, True, 50.0),
]


def emulated_error(rows, cols, bits, batch, with_scale, xscale):
    gen = torch.Generator().manual_seed(rows * 7 + bits)
    _, packed, lut = block(rows, cols, bits, gen)
    x = (torch.randn(batch, cols, generator=gen) * xscale).half()
    x[0, cols // 2] = 40 * xscale  # an outlier sets the fixed-point range
    scale = (torch.rand(cols, generator=gen) + 0.5).half() if with_scale else None
    xpl, xs = xplanes.x_planes(x, scale)
    y = tb.emulate(xpl, xs, packed, tb.subset_coefficients(lut, bits), bits, cols)
    ref = lut_linear_ref(x.float(), packed, lut, bits, cols, input_scale=None if scale is None else scale.float())
    return rel_err(y, ref)


@pytest.fixture(scope="module")
def interpreted_errors():
    """Every case's relative error with the planes made under the interpreter (subprocess)."""
    return worker_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_planes_and_kernel_arithmetic_match_reference(interpreted_errors, case):
    assert interpreted_errors[str(case)] < 1e-5  # x rounded to 24 bits: far below fp16's 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("widths,batch,extra", [
    ((3,), 1, ""), ((4,), 1, "ridx"), ((1, 2, 3), 2, "scale"), ((3, 4), 1, "bf16"), ((2, 8), 3, "ridx"),
    ((3,), 1, "ks8"), ((4,), 2, "ks2"), ((3, 4), 1, "regs128"), ((2, 4), 2, "regs168"),
])
def test_bmma_cuda_matches_reference(widths, batch, extra):
    from anybit.kernels import triton_lut

    gen = torch.Generator().manual_seed(len(widths) * 10 + batch)
    rows, cols = 211, 1100
    owner = torch.randint(0, len(widths), (rows,), generator=gen)
    xdt = torch.bfloat16 if "bf16" in extra else torch.float16
    out_f = rows + 5 if "ridx" in extra else rows
    dest = torch.randperm(out_f, generator=gen)[:rows] if "ridx" in extra else torch.arange(rows)
    scale = (torch.rand(cols, generator=gen) + 0.5).half() if "scale" in extra else None
    x = torch.randn(batch, cols, generator=gen).to(xdt)
    blocks, ref = [], torch.full((batch, out_f), float("nan"), dtype=xdt)
    for i, bits in enumerate(widths):
        members = (owner == i).nonzero().squeeze(1)
        _, packed, lut = block(members.numel(), cols, bits, gen)
        lut_linear_ref(x, packed, lut, bits, cols, dest[members], ref, input_scale=scale)
        blocks.append((packed.cuda(), lut.cuda(), bits, dest[members].cuda()))
    y = torch.full((batch, out_f), float("nan"), dtype=xdt, device="cuda")
    # (warps, STAGES[, maxnreg]), 0: the rule's; else the rule
    config = {"ks8": (8, 2), "ks2": (4, 3), "regs128": (0, 0, 128), "regs168": (0, 0, 168)}.get(extra)
    triton_lut.launch_blocks(x.cuda(), blocks, cols, y, None if scale is None else scale.cuda(), mode="bmma",
                             config=config)
    written = torch.isfinite(ref)
    got = y.cpu()
    assert torch.isnan(got[~written]).all(), "rows outside row_index were written"
    assert rel_err(got[written], ref[written]) < (TOL if xdt == torch.float16 else 1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 2])
def test_bmma_cuda_sums_exactly_when_every_plane_counts_the_whole_row(batch):
    """x = -2**-22 beside one 1.0: every other column's fixed point is -1, all 24 planes set, so each
    mask's counts reach ~K in every plane group (the epilogue's int32 join of groups 0 and 1 and its
    sign-plane weight at their largest). The kernel equals ``emulate`` (exact sums, fp32) to within
    fp16's rounding, over a long row (K = 40000) and a 3 + 4-bit matrix."""
    from anybit.kernels import triton_lut

    gen = torch.Generator().manual_seed(batch)
    rows, cols = 48, 40000
    x = torch.full((batch, cols), -(2.0 ** -22)).half()
    x[:, 7] = 1.0
    blocks, want = [], torch.empty(batch, rows)
    planes = xplanes.x_planes(x.cuda())
    assert (xplanes.plane_words(planes[0])[:, :, 1:cols // 32] == -1).all()  # every plane of -1 is set
    for bits, members in ((3, torch.arange(0, rows, 2)), (4, torch.arange(1, rows, 2))):
        _, packed, lut = block(members.numel(), cols, bits, gen)
        want[:, members] = tb.emulate(planes[0].cpu(), planes[1].cpu(), packed, tb.subset_coefficients(lut, bits),
                                      bits, cols)
        blocks.append((packed.cuda(), lut.cuda(), bits, members.cuda()))
    y = torch.full((batch, rows), float("nan"), dtype=torch.float16, device="cuda")
    triton_lut.launch_blocks(x.cuda(), blocks, cols, y, mode="bmma")
    assert ((y.cpu().float() - want).abs() <= want.abs() * 2.0**-10).all()  # one fp16 rounding of want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("widths", [(3, 4), (2, 3), (3,)])
def test_bmma_cuda_output_does_not_depend_on_copy_stages_or_tiles_a_program(widths):
    """The stages only set how far ahead the copies run and a program's tiles share one ring of
    them; the sums, and so every output bit, stay the same (a stage written over before it is read,
    or a tile's copies landing in another's, would show here), on rows long enough for 5 stages and
    with a last program short of tiles (3 or 10 tiles a block)."""
    from anybit.kernels import triton_lut

    gen = torch.Generator().manual_seed(sum(widths))
    rows, cols = 160, 11008
    x = torch.randn(2, cols, generator=gen).half().cuda()
    members = (torch.arange(0, rows, 4), torch.arange(1, rows, 4)) if len(widths) == 2 else (torch.arange(rows),)
    blocks = []
    for bits, rows_of in zip(widths, members):
        _, packed, lut = block(rows_of.numel(), cols, bits, gen)
        blocks.append((packed.cuda(), lut.cuda(), bits, rows_of.cuda()))
    outs = []
    for stages, tiles in ((2, 1), (3, 1), (4, 1), (5, 1), (8, 1), (2, 2), (4, 2), (5, 3), (3, 4)):
        y = torch.full((2, rows), float("nan"), dtype=torch.float16, device="cuda")
        triton_lut.launch_blocks(x, blocks, cols, y, mode="bmma", config=(0, stages, 0, tiles))
        outs.append(y.cpu())
    written = torch.cat(members)
    assert torch.isfinite(outs[0][:, written]).all()
    assert all(torch.equal(o[:, written], outs[0][:, written]) for o in outs[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("widths,batch,scaled", [((3, 4), 1, False), ((3,), 2, True), ((2, 3, 4), 1, False)])
def test_bmma_cuda_planned_launch_computes_what_launch_computes(widths, batch, scaled):
    """``BmmaLaunch`` made once and called again and again (its launches then straight through the
    compiled kernels) writes what ``launch`` writes for each fresh x, bit for bit: with its own planes
    or given ones, into a fresh y or one misaligned for 16-byte loads (a pass through the JIT)."""
    gen = torch.Generator().manual_seed(sum(widths) + batch)
    rows, cols = 211, 1100
    owner = torch.randint(0, len(widths), (rows,), generator=gen)
    scale = (torch.rand(cols, generator=gen) + 0.5).half().cuda() if scaled else None
    blocks = []
    for i, bits in enumerate(widths):
        members = (owner == i).nonzero().squeeze(1)
        _, packed, lut = block(members.numel(), cols, bits, gen)
        packed, lut = packed.cuda(), lut.cuda()
        blocks.append((packed, lut, bits, members.cuda(), tb.prepare_block(packed, lut, bits)))
    plan = tb.BmmaLaunch(blocks, cols, batch, "cuda", scale)
    for call in range(4):
        x = torch.randn(batch, cols, generator=gen).half().cuda()
        want = torch.full((batch, rows), float("nan"), dtype=x.dtype, device="cuda")
        tb.launch(x, blocks, cols, want, scale)
        y = torch.full((batch * rows + 1,), float("nan"), dtype=x.dtype, device="cuda")
        y = y[1:].view(batch, rows) if call == 2 else y[:-1].view(batch, rows)
        planes = xplanes.x_planes(x, scale) if call == 3 else None
        assert torch.equal(plan(x, y, planes), want) and torch.equal(y, want), call
    assert len(plan.launches) == -(-len(widths) // 2) and all(launch.kernel is not None for launch in plan.launches)
    with pytest.raises(ValueError, match="x planes of shape"):
        plan(x, y, xplanes.x_planes(torch.zeros(batch, 3000, dtype=x.dtype, device="cuda")))

if __name__ == "__main__":
    print(json.dumps({str(c): emulated_error(*c) for c in CASES}))
