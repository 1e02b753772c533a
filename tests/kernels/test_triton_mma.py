"""Fragment-decoding LUT kernel (anybit.kernels.triton_mma): the x fragments' column order, the
decoding PTX run by a small interpreter of its integer instructions (every width and column
offset, against the codebook entries it must produce), the launch rule, and the Gluon kernel
itself on CUDA when there is a GPU (skipped otherwise)."""

from __future__ import annotations

import re

import pytest
import torch

from anybit.formats.bitpack import pack_bitplanes
from anybit.kernels import lut_linear_ref
from checks import rel_err

pytest.importorskip("triton")
from anybit.kernels import triton_mma as tm  # noqa: E402

TOL = 1e-3  # relative error, fp16


@pytest.mark.parametrize("cols,scaled", [(128, False), (200, False), (300, True)])
def test_x_fragments_hold_the_columns_the_kernel_pairs(cols, scaled):
    gen = torch.Generator().manual_seed(cols)
    x = torch.randn(3, cols, generator=gen).half()
    scale = (torch.rand(cols, generator=gen) + 0.5).half() if scaled else None
    frag = tm.x_fragments(x, scale)
    want = (x.float() / scale.float()).half() if scaled else x
    padded = -(-cols // 128) * 128
    assert frag.shape == (padded // 32, 8, 3, 2) and frag.dtype == torch.int32
    halves = frag.view(torch.float16).view(padded // 32, 8, 3, 2, 2)  # [c, j, m, i, e]
    full = torch.zeros(3, padded, dtype=torch.float16)
    full[:, :cols] = want
    c, j, i, e = torch.meshgrid(torch.arange(padded // 32), torch.arange(8), torch.arange(2), torch.arange(2),
                                indexing="ij")
    col = 32 * c + 16 * i + j + 8 * e  # the pair (j, j + 8) of half i of chunk c
    assert torch.equal(halves.permute(2, 0, 1, 3, 4), full[:, col])


def test_row_scales_fit_bf16_rows_into_fp16_without_rounding():
    x = torch.tensor([[1e6, -3.0, 2.0**-7 * 1.5, 0.0], [1e-3, 5e-4, -1e-3, 0.0], [0.0] * 4]).bfloat16()
    scales = tm.row_scales(x)
    scaled = x.float() / scales[:, None]
    assert scaled.abs().amax() <= 2.0**14 and torch.all(torch.log2(scales) == torch.round(torch.log2(scales)))
    assert torch.equal((scaled.half().float() * scales[:, None]), x.float())  # every bf16 bit kept


def run_ptx(asm: str, regs: dict[str, int]) -> dict[str, int]:
    """Interpret the integer instructions of ``fragment_asm`` (the mma line is skipped)."""
    env = dict(regs)

    def val(tok):
        tok = tok.strip()
        return int(tok, 0) if tok[0].isdigit() else env[tok]

    for line in asm.splitlines():
        m = re.match(r"(\w+(?:\.\w+)*) (.*);$", line.strip())
        if not m or m.group(1).startswith((".reg", "mma")):
            continue
        op, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        a = [val(t) for t in args[1:]]
        if op == "shr.b32":
            r = a[0] >> a[1]
        elif op == "shl.b32":
            r = a[0] << a[1]
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "or.b32":
            r = a[0] | a[1]
        elif op == "mov.b32":
            r = a[0]
        elif op == "mad.lo.u32":
            r = a[0] * a[1] + a[2]
        elif op == "prmt.b32":
            pool = (a[1] << 32 | a[0]).to_bytes(8, "little")
            assert all((a[2] >> (4 * k)) & 8 == 0 for k in range(4)), "sign-replicating selector"
            r = int.from_bytes(bytes(pool[(a[2] >> (4 * k)) & 7] for k in range(4)), "little")
        else:
            raise AssertionError(f"unexpected instruction {op}")
        env[args[0]] = r & 0xFFFFFFFF
    return env


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("ntiles", [1, 2])
def test_fragment_asm_decodes_the_codebook_entries_of_its_columns(bits, ntiles):
    gen = torch.Generator().manual_seed(bits * 10 + ntiles)
    out = 4 * ntiles
    for s in range(8):
        planes = torch.randint(0, 2**32, (2, 4), generator=gen, dtype=torch.int64).tolist()  # [row][plane]
        lut = (torch.randn(2, 16, generator=gen)).half()
        words = lut.view(torch.int16).to(torch.int64) & 0xFFFF
        words = (words[:, 0::2] | (words[:, 1::2] << 16)).tolist()  # [row][word]: entries 2w, 2w + 1
        regs = {}
        for row in (0, 1):
            for p in range(4):
                regs[f"${(out if p < 2 else out + 4) + 2 * row + p % 2}"] = planes[row][p] if p < bits else 0
            for w in range(8):
                regs[f"${out + 8 + 4 * (w // 2) + 2 * row + w % 2}"] = words[row][w]
        asm = tm.fragment_asm(bits, s, ntiles)
        env = run_ptx(asm, regs)

        def entry(row, col):
            code = sum(((planes[row][p] >> col) & 1) << p for p in range(bits))
            return int(words[row][code // 2] >> (16 * (code % 2))) & 0xFFFF

        for name, row, c0 in (("a0", 0, s), ("a1", 1, s), ("a2", 0, s + 16), ("a3", 1, s + 16)):
            assert env[name] == entry(row, c0) | entry(row, c0 + 8) << 16, (bits, s, name)
        mmas = [line for line in asm.splitlines() if line.startswith("mma")]
        assert len(mmas) == ntiles
        for n, line in enumerate(mmas):  # D of n-tile n, the same A, B fragment n, C of n-tile n
            d = ",".join(f"${4 * n + k}" for k in range(4))
            c = ",".join(f"${out + 28 + 4 * n + k}" for k in range(4))
            b = f"${out + 24 + 2 * n},${out + 25 + 2 * n}"
            assert f"{{{d}}}, {{a0,a1,a2,a3}}, {{{b}}}, {{{c}}}" in line
    assert tm.fragment_constraints(ntiles).count(",") + 1 == 8 * ntiles + 28


def test_launch_rule_splits_k_for_short_matrices_and_pairs_row_tiles_past_8_rows():
    assert tm.config_for([(3, 11008)], 32, 1) == (4, 1)
    assert tm.config_for([(3, 11008)], 32, 8) == (4, 1)
    assert tm.config_for([(3, 11008)], 32, 16) == (4, 2)
    assert tm.config_for([(3, 28672)], 32, 16) == (2, 2)
    assert tm.config_for([(4, 4096), (3, 12288)], 32, 12) == (4, 2)
    assert tm.config_for([(4, 4096)], 86, 4) == (8, 1)  # short: 256 tiles x 8 warps along K
    assert tm.config_for([(4, 4096)], 86, 16) == (8, 2)
    assert tm.config_for([(4, 1024), (3, 3072)], 86, 16) == (8, 1)  # short and mixed: one tile a warp
    assert tm.config_for([(3, 4096)], 16, 2) == (4, 1)  # too few steps for 8 warps along K


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("widths,batch,extra", [
    ((1,), 2, ""), ((2,), 9, ""), ((3,), 2, ""), ((4,), 16, "ridx"), ((3, 4), 5, "ridx"), ((1, 2, 3), 3, "scale"),
    ((2, 8), 12, "ridx"), ((3,), 8, "cfg"), ((4,), 13, "cfg"), ((3, 4), 7, "bf16"), ((2,), 12, "bf16 scale"),
])
def test_mma_cuda_matches_reference(widths, batch, extra):
    from anybit.kernels import triton_lut

    gen = torch.Generator().manual_seed(len(widths) * 10 + batch)
    rows, cols = 211, 1100
    owner = torch.randint(0, len(widths), (rows,), generator=gen)
    out_f = rows + 5 if "ridx" in extra else rows
    dest = torch.randperm(out_f, generator=gen)[:rows] if "ridx" in extra else torch.arange(rows)
    scale = (torch.rand(cols, generator=gen) + 0.5).half() if "scale" in extra else None
    xdt = torch.bfloat16 if "bf16" in extra else torch.float16
    x = (torch.randn(batch, cols, generator=gen) * (3e5 if xdt == torch.bfloat16 else 1)).to(xdt)  # past fp16's range
    blocks, ref = [], torch.full((batch, out_f), float("nan"), dtype=torch.float32)
    for i, bits in enumerate(widths):
        members = (owner == i).nonzero().squeeze(1)
        codes = torch.randint(0, 2**bits, (members.numel(), cols), generator=gen)
        packed, lut = pack_bitplanes(codes, bits), (torch.randn(members.numel(), 2**bits, generator=gen) * 0.05).half()
        lut_linear_ref(x.float(), packed, lut, bits, cols, dest[members], ref, input_scale=scale)
        blocks.append((packed.cuda(), lut.cuda(), bits, dest[members].cuda()))
    y = torch.full((batch, out_f), float("nan"), dtype=xdt, device="cuda")
    config = (2, 2) if extra == "cfg" else None  # else the rule
    # the default for 2..16 rows of fp16 x; "mma" named only with a config (wider blocks: the dot kernel)
    mode = "mma" if config else None
    triton_lut.launch_blocks(x.cuda(), blocks, cols, y, None if scale is None else scale.cuda(), mode=mode,
                             config=config)
    written = torch.isfinite(ref)
    got = y.cpu().float()
    assert torch.isnan(got[~written]).all(), "rows outside row_index were written"
    assert rel_err(got[written], ref[written]) < (1e-2 if xdt == torch.bfloat16 else TOL)  # bf16 output: 2**-9
