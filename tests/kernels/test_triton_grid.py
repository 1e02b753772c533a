"""The kernels of the grids without a codebook per row (``triton_grid``: affine grids per row and
group, codebooks per column) against the dense product of the de-quantized weight: on CPU under
Triton's interpreter (a subprocess, ``interpreted.worker_results``), and through ``AnybitLinear`` on
CUDA when there is a GPU."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the interpreter worker
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from anybit.nn import AnybitLinear  # noqa: E402
from checks import rel_err  # noqa: E402
from interpreted import worker_results  # noqa: E402
from tests.formats.random_qweights import random_affine, random_lut, with_extras  # noqa: E402

TOL = 1e-3  # relative error, fp16

# (name, weight maker, rows of x): odd shapes, mixed widths 1..8, every extra, several output tiles,
# batches of one row (FMA), a few rows (dot) and more than one tile of x's rows.
CASES = {
    "affine-g32-mixed-extras": (lambda: with_extras(random_affine(70, 200, 32, seed=1), seed=1), (1, 3)),
    "affine-g64-3-4": (lambda: random_affine(130, 256, 64, seed=2, widths=(3, 4)), (1, 20)),
    "affine-g128-one-width": (lambda: random_affine(65, 300, 128, seed=3, widths=(3, 3)), (1, 2)),
    "affine-channel-extras": (lambda: with_extras(random_affine(33, 77, 0, seed=4), seed=4), (1, 5)),
    "cols-mixed-extras": (lambda: with_extras(random_lut(70, 90, 1, seed=5), seed=5), (1, 3)),
    "cols-3-4": (lambda: random_lut(200, 150, 1, seed=6, widths=(3, 4)), (1, 17)),
}


def case_errors(device: str, dtype: torch.dtype) -> dict[str, float]:
    """Relative error of each case's kernel output against the dense product (x in ``dtype``)."""
    from anybit.kernels import grid_linear, triton_grid

    errors = {}
    for name, (make, batches) in CASES.items():
        q = make()
        module = AnybitLinear.from_quantized(q).to(device)
        ops = module._grid_operands()
        assert {b.mode for b in ops["blocks"]} == {triton_grid.AFFINE if module.spec.grid == "affine" else triton_grid.COLUMNS}
        for batch in batches:
            x = torch.randn(batch, q.in_features, generator=torch.Generator().manual_seed(batch)).to(device, dtype)
            want = x.double() @ q.dequantize(torch.float64).t().to(device)
            y = torch.full((batch, q.out_features), float("nan"), dtype=dtype, device=device)
            grid_linear(x, ops["blocks"], y, inv_input_scale=ops["inv_input_scale"], outliers=ops["outliers"])
            errors[f"{name}-b{batch}"] = rel_err(y, want)
    return errors


def test_kernels_match_the_dense_product_under_the_interpreter():
    errors = worker_results(__file__)
    assert len(errors) == sum(len(b) for _, b in CASES.values())
    bad = {k: v for k, v in errors.items() if not v < 1e-5}  # fp32 x: only summation order differs
    assert not bad, bad


def test_grid_mode_serves_what_the_kernel_can_take(monkeypatch):
    pytest.importorskip("triton")
    import anybit.kernels as kernels
    from anybit.kernels import triton_grid

    monkeypatch.setattr(kernels, "use_triton", lambda x: True)  # as on a GPU
    x = torch.zeros(3, 64)
    monkeypatch.delenv("ANYBIT_GRID_KERNELS", raising=False)
    assert kernels.grid_mode("affine", 0, 128, x) is None  # on request only, until a GPU has run them
    monkeypatch.setenv("ANYBIT_GRID_KERNELS", "1")
    assert kernels.grid_mode("affine", 0, 128, x) == triton_grid.AFFINE
    assert kernels.grid_mode("affine", 0, 0, x) == triton_grid.AFFINE
    assert kernels.grid_mode("affine", 0, 48, x) is None  # a step of 32 columns would straddle groups
    assert kernels.grid_mode("lut", 1, 0, x) == triton_grid.COLUMNS
    assert kernels.grid_mode("lut", 0, 0, x) is None  # per-row codebooks have their own kernels
    prefill = torch.zeros(2, (triton_grid.MAX_BATCH + 2) // 2, 64)
    assert kernels.grid_mode("affine", 0, 128, prefill) is None  # decoding the weight once is cheaper


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernels_match_the_dense_product(dtype):
    errors = case_errors("cuda", dtype)
    bad = {k: v for k, v in errors.items() if not v < TOL * (4 if dtype == torch.bfloat16 else 1)}
    assert not bad, bad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_runs_the_grid_kernels_up_to_max_batch_with_one_copy_of_the_codes(monkeypatch):
    from anybit.kernels import triton_grid

    monkeypatch.setenv("ANYBIT_GRID_KERNELS", "1")
    calls = []
    launch = triton_grid.launch
    monkeypatch.setattr(triton_grid, "launch", lambda *a, **k: calls.append(a[0].shape[0]) or launch(*a, **k))
    q = with_extras(random_affine(96, 256, 128, seed=7, widths=(2, 4)), seed=7)
    module = AnybitLinear.from_quantized(q, torch.randn(96)).cuda()
    cols = with_extras(random_lut(96, 256, 1, seed=8, widths=(3, 4)), seed=8)
    per_column = AnybitLinear.from_quantized(cols).cuda()
    saved = {k: v.clone() for k, v in per_column.state_dict().items()}
    for batch in (1, 16, triton_grid.MAX_BATCH, triton_grid.MAX_BATCH + 1):
        x = torch.randn(batch, 256, generator=torch.Generator().manual_seed(batch)).cuda().half()
        want = x.double() @ q.dequantize(torch.float64).t().cuda() + module.bias.double()
        assert rel_err(module(x), want) < TOL
        assert rel_err(per_column(x), x.double() @ cols.dequantize(torch.float64).t().cuda()) < TOL
    assert calls == [1, 1, 16, 16, triton_grid.MAX_BATCH, triton_grid.MAX_BATCH]
    # the per-column codes are kept packed along the columns only; the checkpoint layout comes back
    assert per_column.kernel_order_widths() == sorted(per_column.spec.blocks)
    assert all(torch.equal(v.cpu(), saved[k].cpu()) for k, v in per_column.state_dict().items())


if __name__ == "__main__":
    print(json.dumps(case_errors("cpu", torch.float32)))


def _compile_for_sm90(kernel, constexprs: dict, pointer_types: dict, warps: int = 4):
    """``kernel`` compiled for an H100 (sm_90) with Triton's bundled ptxas, no GPU needed."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else pointer_types.get(name, "i32")
                 for name in kernel.arg_names}
    try:
        return triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": 3})
    except RuntimeError as err:  # no ptxas in this Triton build
        if "ptxas" in str(err).lower():
            pytest.skip(f"cannot compile for sm_90 here: {err}")
        raise


@pytest.mark.parametrize("rows_of_x", [1, 2, 16])
@pytest.mark.parametrize("mode, bits, index, scale", [(0, 3, False, False), (0, 3, True, False), (0, 4, True, True),
                                                      (1, 3, False, False), (1, 3, True, False), (1, 4, True, True)])
def test_kernels_compile_for_an_h100_without_spilling(mode, bits, index, scale, rows_of_x, monkeypatch):
    """Every kernel variant the launcher picks compiles to sm_90 code (Triton's front end and ptxas, no
    GPU): a GPU-only compile error shows up here, and no variant spills registers to local memory."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # what Triton 3.6 on the GPU machine does by default
    from anybit.kernels import triton_grid

    dot, block_m, block_n, warps, _ = triton_grid.launch_shape(mode, rows_of_x)
    kernel = triton_grid._grid_dot_kernel if dot else triton_grid._grid_row_kernel
    constexprs = dict(MODE=mode, BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n,
                      CH=triton_grid.step_columns(mode, 128 if mode == 0 else 0, dot) // 32, HAS_INDEX=index,
                      HAS_SCALE=scale)
    pointers = {"x_ptr": "*fp16", "scale_ptr": "*fp32", "xidx_ptr": "*i32", "codes_ptr": "*i32", "val_ptr": "*fp16",
                "zero_ptr": "*fp16", "y_ptr": "*fp16", "ws_ptr": "*fp32", "sem_ptr": "*i32"}
    compiled = _compile_for_sm90(kernel, constexprs, pointers, warps)
    assert compiled.asm["cubin"]
    import triton.backends.nvidia as nvidia

    cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        import re
        import subprocess
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True,
                                   text=True).stdout
        assert re.search(r"STACK:0\b", usage), usage  # no registers spilled to the stack
