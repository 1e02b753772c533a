"""x bit planes (anybit.kernels.xplanes): the planes of x, and the fused producers (residual add +
RMSNorm, SiLU-and-multiply) whose planes must be exactly ``x_planes`` of the values they write.
The Triton kernel runs under the interpreter in a subprocess (``interpreted``), and on CUDA when
there is a GPU."""

from __future__ import annotations

import os

if __name__ == "__main__":  # the interpreter worker (see ``interpreted_results``)
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from interpreted import worker_results  # noqa: E402

triton = pytest.importorskip("triton")
from anybit.kernels import xplanes  # noqa: E402

CASES = [  # (rows, columns, dtype, residual given, strided input); past 16384 columns the row is read in blocks
    (1, 300, "float16", True, False), (3, 1000, "float16", False, True), (2, 2100, "bfloat16", True, True),
    (1, 16500, "float16", True, False),
]


def rms_norm_ref(h, weight, eps):
    """LlamaRMSNorm, as transformers computes it."""
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of b's last place (of its dtype)."""
    step = torch.finfo(b.dtype).eps * b.float().abs().clamp_min(torch.finfo(b.dtype).tiny)
    return float(((a.float() - b.float()).abs() / step).max())


def inputs(rows, cols, dtype, strided, gen):
    """Two (rows, cols) tensors, as views into one (rows, 2 * cols) tensor when ``strided`` (as a
    stacked gate/up output chunked in two). Row r's largest values sit at column cols - 1 - r * cols
    // 4, so that across the cases every piece of a row (``xplanes.row_blocks``) holds the maximum."""
    both = torch.randn(rows, 2 * cols, generator=gen) * 2
    for r in range(rows):
        c = cols - 1 - r * (cols // 4)
        both[r, [c, cols + c]] = torch.tensor([9.0, -7.0]) * (1 + r)
    both = both.to(getattr(torch, dtype))
    if strided:
        return both[:, :cols], both[:, cols:]
    return both[:, :cols].contiguous(), both[:, cols:].contiguous()


def same_planes(got, want) -> bool:
    return bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))


def case_results(rows, cols, dtype, with_delta, strided, device="cpu"):
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    h, delta = (t.to(device) for t in inputs(rows, cols, dtype, strided, gen))
    weight = (torch.rand(cols, generator=gen) + 0.5).to(h.dtype).to(device)
    s, y, planes = xplanes.add_rms_norm_planes(h, delta if with_delta else None, weight, 1e-5)
    s_ref = h + delta if with_delta else h
    gate, up = h, delta
    g, gplanes = xplanes.silu_mul_planes(gate, up)
    scale = (torch.rand(cols, generator=gen) + 0.5).to(h.dtype).to(device)
    planned = xplanes.XPlanesLaunch(rows, cols, device), xplanes.XPlanesLaunch(rows, cols, device, scale)
    return {
        "planned_planes_exact": all(same_planes(planned[0](x), xplanes.x_planes(x))
                                    and same_planes(planned[1](x), xplanes.x_planes(x, scale)) for x in (h, delta)),
        "sum_equal": bool(torch.equal(s, s_ref)),
        "norm_ulps": ulps(y, rms_norm_ref(s_ref, weight, 1e-5)),
        "norm_planes_exact": same_planes(planes, xplanes.x_planes(y)),
        "silu_ulps": ulps(g, F.silu(gate) * up),
        "silu_planes_exact": same_planes(gplanes, xplanes.x_planes(g)),
    }


@pytest.fixture(scope="module")
def interpreted_results():
    return worker_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_producers_write_the_planes_of_what_they_write(interpreted_results, case):
    r = interpreted_results[str(case)]
    assert r["norm_planes_exact"] and r["silu_planes_exact"] and r["planned_planes_exact"]
    if case[2] == "bfloat16":
        # Triton 3.9's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest), so its bf16
        # values are a step off; the planes still match what it wrote. Values: the CUDA test.
        return
    assert r["sum_equal"]
    # fp32 statistics summed in another order: at most one rounding step apart
    assert r["norm_ulps"] <= 1.0 and r["silu_ulps"] <= 1.0


def test_plane_chunks_pad_to_whole_programs_of_the_widest_k_split():
    tile_cols = 32 * xplanes.KTILE
    for k in (1, 255, 256, 4096, 11008, 14336):
        n = xplanes.plane_chunks(k)
        assert n * 32 >= k and n % (xplanes.KTILE * xplanes.MAX_KSPLIT) == 0
        assert n * 32 - k < tile_cols * xplanes.MAX_KSPLIT
        assert n % xplanes.CHUNKS_PER_PROGRAM == 0


def test_row_blocks_cover_the_row_with_few_power_of_two_pieces():
    for k in (1, 7, 300, 1000, 2100, 4096, 5120, 11008, 14336, 16384):
        block, p1, p2, loop = xplanes.row_blocks(k, xplanes.MODE_SILU_MUL)
        pieces = [p for p in (block, p1, p2) if p]
        assert not loop and sum(pieces) >= k and sum(pieces) - k < pieces[-1]
        assert all(p & (p - 1) == 0 for p in pieces) and pieces == sorted(pieces, reverse=True)
        assert xplanes.row_blocks(k, xplanes.MODE_RMS_NORM) == (triton.next_power_of_2(k), 0, 0, False)
    assert xplanes.row_blocks(11008, xplanes.MODE_SILU_MUL)[:3] == (8192, 2048, 1024)
    assert xplanes.row_blocks(16500, xplanes.MODE_X) == (16384, 0, 0, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_producers_cuda(case):
    r = case_results(*case, device="cuda")
    assert r["sum_equal"] and r["norm_planes_exact"] and r["silu_planes_exact"] and r["planned_planes_exact"]
    assert r["norm_ulps"] <= 1.0 and r["silu_ulps"] <= 1.0


def test_planned_planes_refuse_another_shape():
    with pytest.raises(ValueError, match=r"planes of \(2, 300\) rows x columns, planned for \(1, 300\)"):
        xplanes.XPlanesLaunch(1, 300, "cpu")(torch.zeros(2, 300, dtype=torch.float16))


if __name__ == "__main__":
    print(json.dumps({str(c): case_results(*c) for c in CASES}))
