"""GPTQ's block of columns in one launch (anybit.kernels.gptq_columns) against the column loop of
``anybit.quant.gptq``: the same codes, values and recorded grids, for per-row codebooks and affine grids
(groups smaller than, equal to and larger than a block, act-order), and exact ties decided as
``torch.searchsorted`` / ``torch.round`` decide them. The kernel runs under Triton's interpreter in a
subprocess (``interpreted``), and on CUDA when there is a GPU."""

from __future__ import annotations

import os

if __name__ == "__main__":  # the interpreter worker (see ``interpreted_results``)
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from interpreted import worker_results  # noqa: E402

pytest.importorskip("triton")
from anybit.quant.gptq import CodebookColumnQuantizer, act_order_permutation, gptq_quantize  # noqa: E402
from anybit.quant.uniform import AffineColumnQuantizer, dequantize_affine, quantize_affine  # noqa: E402

# (rows, cols, grid, group, blocksize, act order); grid "lut": per-row codebooks of 2..16 points
CASES = [
    (37, 200, "lut", 0, 64, False),
    (16, 130, "lut", 0, 128, True),
    (29, 160, "affine", 0, 64, True),
    (29, 160, "affine", 32, 64, False),
    (29, 160, "affine", 128, 64, True),
    (48, 96, "affine", 96, 96, False),
]


def hessian(cols: int, gen: torch.Generator) -> torch.Tensor:
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    x = torch.randn(4 * cols, cols, generator=gen) @ mix
    x[:, : cols // 8] *= 6
    return x.t() @ x / x.shape[0]


def row_codebooks(rows: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted per-row points, rows of 2, 4, 8 or 16 (+inf padded to 16), as SKIM's mixed widths."""
    lut = torch.sort(torch.randn(rows, 16, generator=gen), 1).values
    for r in range(rows):
        lut[r, 2 ** (1 + r % 4):] = torch.inf
    return lut


def run_gptq(case, fused: bool, device: str):
    rows, cols, grid, group, blocksize, act = case
    gen = torch.Generator().manual_seed(rows * cols + group)
    w, h = torch.randn(rows, cols, generator=gen), hessian(cols, gen)
    if grid == "lut":
        quantizer = CodebookColumnQuantizer(row_codebooks(rows, gen).to(device), cols)
    else:
        groups = -(-cols // group) if group else 1
        bits = torch.tensor([2 + g % 3 for g in range(groups)])  # mixed group widths, as SliM-LLM's
        quantizer = AffineColumnQuantizer(rows, cols, bits, group, device=device)
    perm = act_order_permutation(h).to(device) if act else None
    q = gptq_quantize(w.to(device), h.to(device), quantizer, blocksize=blocksize, perm=perm, fused=fused)
    grids = [quantizer.scales, quantizer.zeros] if grid == "affine" else []
    d = w - q.cpu()
    layer_error = float(torch.einsum("ij,jk,ik->", d.double(), h.double(), d.double()))
    return q.cpu(), quantizer.codes.cpu(), [g.cpu() for g in grids], layer_error


def case_results(case, device="cpu"):
    q0, codes0, grids0, err0 = run_gptq(case, False, device)
    q1, codes1, grids1, err1 = run_gptq(case, True, device)
    return {"codes_differ": int((codes0 != codes1).sum()), "codes": codes0.numel(),
            "q_max_diff": float((q0 - q1).abs().max()), "grids_equal": all(map(torch.equal, grids0, grids1)),
            "grids_max_diff": max([float((a - b).abs().max()) for a, b in zip(grids0, grids1)], default=0.0),
            "layer_error_rel_diff": abs(err1 - err0) / err0, "ties": ties_decided_as_torch(device)}


def ties_decided_as_torch(device: str) -> bool:
    """Values exactly on a midpoint / a half step, with no update between columns (step = identity):
    codes and values are those of searchsorted and of quantize_affine."""
    from anybit.kernels import gptq_columns

    lut = torch.tensor([[-1.5, -0.5, 0.25, 2.0], [-3.0, 1.0, torch.inf, torch.inf]], device=device)
    mids = (lut[:, 1:] + lut[:, :-1]) * 0.5
    w = torch.tensor([[-1.0, 0.0, -0.125, 1.125, 9.0, -9.0],
                      [-1.0, -1.0001, 0.5, 1.0, 5.0, -5.0]], device=device)
    eye = torch.eye(w.shape[1], device=device)
    q = torch.empty_like(w)
    codes, err = gptq_columns.quantize_block(w, eye, q, values=lut, midpoints=mids)
    want = torch.searchsorted(mids, w.contiguous())
    ok = torch.equal(codes.long(), want) and torch.equal(q, torch.gather(lut, 1, want)) and torch.equal(err.t(), w - q)
    scale, zero = torch.tensor([0.5, 0.25], device=device), torch.tensor([3.0, 0.0], device=device)
    wa = torch.tensor([[0.25, -0.25, 0.75, -1.25, 1.0, -9.0], [0.125, 0.375, 0.625, -0.125, 9.0, 0.0]], device=device)
    qa = torch.empty_like(wa)
    codes, _ = gptq_columns.quantize_block(wa, eye, qa, scale=scale, zero=zero, maxq=7)
    want = quantize_affine(wa, scale, zero, 3)
    return ok and torch.equal(codes.float(), want) and torch.equal(qa, dequantize_affine(want, scale, zero))


@pytest.fixture(scope="module")
def interpreted_results():
    return worker_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_block_kernel_quantizes_as_the_column_loop(interpreted_results, case):
    r = interpreted_results[str(case)]
    # The interpreter rounds every operation as torch's CPU loop does: identical results.
    assert r["codes_differ"] == 0 and r["q_max_diff"] == 0.0 and r["grids_equal"] and r["ties"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_block_kernel_cuda(case):
    r = case_results(case, "cuda")
    assert r["ties"]
    # The rank-1 update may round otherwise on the GPU (a fused multiply-add): a code moves only where
    # a value sits within rounding of a decision boundary, and the grids fitted to the updated values
    # (fp16 scales, integer zeros) by at most a step.
    assert r["codes_differ"] <= max(1, r["codes"] // 1000), r
    assert r["layer_error_rel_diff"] < 1e-3 and r["grids_max_diff"] <= 1e-3, r


def test_fused_path_refuses_groups_that_cannot_start_blocks():
    quantizer = AffineColumnQuantizer(4, 96, torch.full((2,), 3), 48)
    with pytest.raises(ValueError, match="groups of 48 columns neither fill nor divide blocks of 64"):
        gptq_quantize(torch.randn(4, 96), torch.eye(96), quantizer, blocksize=64, fused=True)


if __name__ == "__main__":
    print(json.dumps({str(c): case_results(c) for c in CASES}))
