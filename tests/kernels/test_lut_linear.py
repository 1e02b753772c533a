"""LUT linear kernels: the reference against a dense computation, the dispatcher, and the Triton
kernels against the reference -- on CPU under Triton's interpreter (TRITON_INTERPRET=1, in a
subprocess: the mode must be set before triton is first imported), and compiled on CUDA when
there is a GPU (skipped otherwise)."""

from __future__ import annotations

import os

if __name__ == "__main__":  # the interpreter worker (see ``interpreted_results``)
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from anybit.formats.bitpack import pack_bitplanes
from anybit.kernels import lut_linear, lut_linear_blocks, lut_linear_ref
from anybit.quant.qweight import QuantizedWeight
from checks import rel_err  # noqa: E402
from interpreted import worker_results  # noqa: E402

TOL = 1e-3  # relative error, fp16


def block(rows, cols, bits, gen, lut_dtype=torch.float16):
    codes = torch.randint(0, 2**bits, (rows, cols), generator=gen)
    lut = (torch.randn(rows, 2**bits, generator=gen).sort(dim=1).values * 0.05).half()
    return codes, pack_bitplanes(codes, bits), lut.to(lut_dtype)


def csr(rows, cols, gen, density=0.05):
    mask = torch.rand(rows, cols, generator=gen) < density
    dense = torch.where(mask, torch.randn(rows, cols, generator=gen), torch.zeros(()))
    return dense, (dense.to_sparse_csr().crow_indices().int(), dense.to_sparse_csr().col_indices().int(),
                   dense.to_sparse_csr().values().half())


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_reference_matches_dense_qweight(bits):
    gen = torch.Generator().manual_seed(bits)
    rows, cols = 23, 77
    codes, packed, lut = block(rows, cols, bits, gen)
    scale = (torch.rand(cols, generator=gen) + 0.5).half()
    qw = QuantizedWeight(rows, cols, codes.to(torch.uint8), torch.full((rows,), bits), lut=lut, input_scale=scale)
    x = torch.randn(3, cols, generator=gen).half()
    dense, parts = csr(rows, cols, gen)
    want = x.double() @ qw.dequantize(torch.float64).t() + x.double() @ dense.half().double().t()
    got = lut_linear_ref(x, packed, lut, bits, cols, input_scale=scale, outliers=parts)
    assert got.dtype == torch.float16 and got.shape == (3, rows)
    assert rel_err(got, want) < TOL


def test_reference_row_index_and_leading_dims():
    gen = torch.Generator().manual_seed(0)
    _, packed, lut = block(10, 40, 3, gen)
    ridx = torch.tensor([7, 0, 3, 12, 5, 1, 9, 2, 11, 4])
    x = torch.randn(2, 3, 40, generator=gen).half()
    out = torch.full((2, 3, 13), 123.0).half()
    lut_linear_ref(x, packed, lut, 3, 40, ridx, out)
    full = lut_linear_ref(x, packed, lut, 3, 40)
    assert torch.equal(out[..., ridx], full)
    untouched = torch.ones(13, dtype=torch.bool)
    untouched[ridx] = False
    assert (out[..., untouched] == 123.0).all()
    with pytest.raises(ValueError):
        lut_linear_ref(x, packed, lut, 3, 40, ridx)  # row_index without out / out_features
    with pytest.raises(ValueError):
        lut_linear_ref(x, packed[:, :-1], lut, 3, 40)


def test_dispatcher_cpu_mixed_blocks():
    gen = torch.Generator().manual_seed(1)
    rows, cols = 29, 70
    bits = torch.tensor([3] * 20 + [4] * 9)[torch.randperm(rows, generator=gen)]
    order = torch.sort(bits, stable=True).indices
    codes = torch.zeros(rows, cols, dtype=torch.long)
    lut = torch.zeros(rows, 16, dtype=torch.float16)
    blocks = []
    for b in (3, 4):
        idx = order[bits[order] == b]
        c, packed, lu = block(idx.numel(), cols, b, gen)
        codes[idx], lut[idx, : 2**b] = c, lu
        blocks.append((packed, lu, b, idx))
    qw = QuantizedWeight(rows, cols, codes.to(torch.uint8), bits, lut=lut)
    x = torch.randn(4, cols, generator=gen).half()
    dense, parts = csr(rows, cols, gen)
    y = lut_linear_blocks(x, blocks, rows, outliers=parts)
    want = x.double() @ qw.dequantize(torch.float64).t() + x.double() @ dense.half().double().t()
    assert rel_err(y, want) < TOL
    y0 = lut_linear_blocks(x, blocks, rows)
    idx = blocks[0][3]
    y1 = lut_linear(x, *blocks[0][:3], cols, idx, out_features=rows)
    assert torch.equal(y1[:, idx], y0[:, idx])


# ----------------------------------------------------------------------------- Triton kernels

CASES = [  # rows, cols, bits, batch, mode, lut dtype, extra
    (37, 200, 3, 1, "fma", torch.float16, ""),
    (37, 200, 3, 3, "dot", torch.float32, "ridx"),
    (19, 100, 1, 1, "fma", torch.float32, "scale"),
    (21, 130, 2, 17, "dot", torch.float16, "scale+outliers"),
    (33, 300, 4, 1, "fma", torch.float16, "ridx+outliers"),
    (40, 64, 5, 2, "dot", torch.float16, ""),
    (17, 96, 6, 1, "fma", torch.float32, "ridx"),
    (18, 70, 7, 1, "fma", torch.float16, "scale"),
    (17, 45, 8, 4, "dot", torch.float32, "ridx"),
    (16, 33, 8, 1, "fma", torch.float16, "bf16"),
    (24, 160, 3, 5, "dot", torch.float16, "bf16+scale"),
    (40, 1100, 3, 3, "dot", torch.float16, "ridx"),  # long enough rows for split-K (4 programs a tile)
    # mixed widths, rows of each width as one block (AnybitLinear's layout): at batch 1 up to
    # three blocks share one launch, codebooks of another dtype get their own
    (45, 200, (3, 4), 1, "fma", torch.float16, "scale"),
    (50, 130, (2, 3, 4), 1, "fma", torch.float16, ""),
    (61, 96, (1, 2, 3, 5), 1, "fma", torch.float16, "bf16"),
    (40, 100, (3, 4), 1, "fma", "mixed", ""),
    (45, 200, (2, 3, 4), 3, "dot", torch.float16, "scale"),
]


def mixed_blocks(rows, cols, widths, gen, lut_dtype):
    """Rows of random widths as blocks (codes, packed, lut, bits, row_index); ``lut_dtype``
    "mixed": the first block's codebook fp32, the others fp16."""
    member = torch.tensor(widths)[torch.randint(0, len(widths), (rows,), generator=gen)]
    member[: len(widths)] = torch.tensor(widths)  # every width present
    blocks = []
    for i, b in enumerate(widths):
        idx = (member == b).nonzero().squeeze(1)
        dtype = (torch.float32 if i == 0 else torch.float16) if lut_dtype == "mixed" else lut_dtype
        blocks.append((*block(idx.numel(), cols, b, gen, dtype), b, idx))
    return blocks


def run_case(tk, device, rows, cols, bits, batch, mode, lut_dtype, extra, use_asm=None):
    if isinstance(bits, tuple):
        return run_mixed_case(tk, device, rows, cols, bits, batch, mode, lut_dtype, extra, use_asm)
    gen = torch.Generator().manual_seed(rows * 131 + bits)
    _, packed, lut = block(rows, cols, bits, gen, lut_dtype)
    xdt = torch.bfloat16 if "bf16" in extra else torch.float16
    out_f = rows + 4 if "ridx" in extra else rows
    ridx = torch.randperm(out_f, generator=gen)[:rows] if "ridx" in extra else None
    scale = (torch.rand(cols, generator=gen) + 0.5).half() if "scale" in extra else None
    parts = csr(out_f, cols, gen)[1] if "outliers" in extra else None
    x = torch.randn(batch, cols, generator=gen).to(xdt)
    y = torch.full((batch, out_f), float("nan"), dtype=xdt)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    yd = y.to(device)
    tk.launch_block(x.to(device), packed.to(device), lut.to(device), bits, cols, yd, mv(ridx), mv(scale),
                    mode=mode, use_asm=use_asm)
    if parts is not None:
        tk.launch_outliers(x.to(device), *[p.to(device) for p in parts], yd)
    ref = torch.full_like(y, float("nan"))
    lut_linear_ref(x, packed, lut, bits, cols, ridx, ref, input_scale=scale, outliers=parts)
    written = torch.isfinite(ref)
    got = yd.cpu()
    assert torch.isnan(got[~written]).all(), "rows outside row_index were written"
    tol = TOL if xdt == torch.float16 else 1e-2
    assert rel_err(got[written], ref[written]) < tol


def run_mixed_case(tk, device, rows, cols, widths, batch, mode, lut_dtype, extra, use_asm=None):
    gen = torch.Generator().manual_seed(rows * 131 + len(widths))
    blocks = mixed_blocks(rows, cols, widths, gen, lut_dtype)
    xdt = torch.bfloat16 if "bf16" in extra else torch.float16
    scale = (torch.rand(cols, generator=gen) + 0.5).half() if "scale" in extra else None
    x = torch.randn(batch, cols, generator=gen).to(xdt)
    yd = torch.full((batch, rows), float("nan"), dtype=xdt).to(device)
    tk.launch_blocks(x.to(device), [(p.to(device), lut.to(device), b, idx.to(device)) for _, p, lut, b, idx in blocks],
                     cols, yd, None if scale is None else scale.to(device), mode=mode, use_asm=use_asm)
    ref = torch.full((batch, rows), float("nan"), dtype=xdt)
    for _, packed, lut, b, idx in blocks:
        lut_linear_ref(x, packed, lut, b, cols, idx, ref, input_scale=scale)
    assert torch.isfinite(ref).all()
    tol = TOL if xdt == torch.float16 else 1e-2
    assert rel_err(yd.cpu(), ref) < tol


def case_id(c):
    bits = "+".join(map(str, c[2])) if isinstance(c[2], tuple) else c[2]
    return f"{c[0]}x{c[1]}-b{bits}-m{c[3]}-{c[4]}-{c[6] or 'plain'}"


@pytest.fixture(scope="module")
def interpreted_results():
    """Every case run once under the interpreter, in one subprocess: {case id: error or ""}."""
    return worker_results(__file__, TRITON_DEFAULT_FP_FUSION="1")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_interpreter_matches_reference(interpreted_results, case):
    assert interpreted_results[case_id(case)] == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_cuda_matches_reference(case):
    pytest.importorskip("triton")
    from anybit.kernels import triton_lut

    run_case(triton_lut, "cuda", *case)


if __name__ == "__main__":
    import traceback

    from anybit.kernels import triton_lut

    results = {}
    for c in CASES:
        try:
            run_case(triton_lut, "cpu", *c, use_asm=False)
            results[case_id(c)] = ""
        except Exception:
            results[case_id(c)] = traceback.format_exc()[-1500:]
    print(json.dumps(results))
