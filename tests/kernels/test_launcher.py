"""Launching a compiled Triton kernel again without Triton's dispatch (anybit.kernels.launcher): the key
of what the JIT specializes on, the calls under the interpreter (every one through the JIT), and on CUDA
the direct launches and the passes through the JIT whenever a changing argument specializes otherwise."""

from __future__ import annotations

import os

if __name__ == "__main__":  # the interpreter worker (see ``worker_results``)
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from interpreted import worker_results  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from anybit.kernels import launcher  # noqa: E402


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * scale, mask=i < n)


def scale_launch(device, n=40):
    """y[:n] = 3 * x[:n], with x, y and n changing from call to call."""
    x = torch.zeros(n, device=device)
    return launcher.KernelLaunch(_scale_kernel, (1,), [x, x, n, 3.0, 64], {"num_warps": 1}, ("x_ptr", "y_ptr", "n"))


def test_the_key_is_what_the_jit_specializes_on():
    t = torch.zeros(8, dtype=torch.float16)
    def key(value):
        return launcher.specialization_key([value])

    assert key(t) == key(t[8:]) != key(t[1:])  # 16-byte aligned or not (fresh storage is aligned)
    assert key(t) != key(t.float())  # the pointer's element type
    assert key(16) != key(17) and key(1) != key(True) and key(16) == key(16)
    assert launcher.specialization_key([t, 16]) == (key(t)[0], key(16)[0])


def test_arguments_and_parameters_must_match():
    with pytest.raises(ValueError, match="5 parameters, 4 arguments"):
        launcher.KernelLaunch(_scale_kernel, (1,), [None] * 4, {}, ())


def run_calls(device) -> dict:
    """Calls with fresh tensors, a misaligned view, another length and another dtype: each output
    against torch, and whether the launch then holds a compiled kernel."""
    gen = torch.Generator().manual_seed(0)
    launch = scale_launch(device)
    results = []
    buffer = torch.randn(100, generator=gen).to(device)
    for x, n in ((torch.randn(40, generator=gen).to(device), 40), (torch.randn(40, generator=gen).to(device), 40),
                 (buffer[1:41], 40), (buffer[:33], 33), (torch.randn(40, generator=gen).to(device).half(), 40)):
        y = torch.full((64,), float("nan"), device=device, dtype=x.dtype)
        launch(x, y, n)
        results.append(bool(torch.equal(y[:n], x * 3) and torch.isnan(y[n:]).all()))
    # one value for two parameters: x scaled in place
    in_place = launcher.KernelLaunch(_scale_kernel, (1,), [None, None, 0, 3.0, 64], {}, (("x_ptr", "y_ptr"), "n"))
    for _ in range(2):
        z = torch.randn(50, generator=gen).to(device)
        want = torch.cat([z[:40] * 3, z[40:]])
        in_place(z, 40)
        results.append(bool(torch.equal(z, want)))
    return {"right": results, "compiled": launch.kernel is not None}


@pytest.fixture(scope="module")
def interpreted():
    return worker_results(__file__)


def test_interpreted_calls_go_through_the_jit_and_compute_the_same(interpreted):
    assert interpreted["right"] == [True] * 7 and not interpreted["compiled"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_calls_launch_directly_while_the_specialization_holds(monkeypatch):
    launch = scale_launch("cuda")
    passes = []
    through_jit = launch._through_jit
    monkeypatch.setattr(launch, "_through_jit", lambda args, key: (passes.append(key), through_jit(args, key)))
    buffer = torch.randn(100, device="cuda")
    calls = [(torch.randn(40, device="cuda"), 40, True), (torch.randn(40, device="cuda"), 40, False),
             (buffer[1:41], 40, True),  # misaligned: the JIT compiles that variant
             (buffer[5:45], 40, False),  # misaligned too: the kept variant
             (torch.randn(40, device="cuda"), 40, True),  # aligned again
             (torch.randn(40, device="cuda"), 33, True),  # another n
             (torch.randn(40, device="cuda").half(), 40, True)]  # another dtype
    for x, n, jit in calls:
        before = len(passes)
        y = torch.full((64,), float("nan"), device="cuda", dtype=x.dtype)
        launch(x, y, n)
        assert torch.equal(y[:n], x[:n] * 3) and torch.isnan(y[n:]).all()
        assert (len(passes) > before) == jit, (x.data_ptr() % 16, n, x.dtype)
    assert launch.kernel is not None
    assert run_calls("cuda") == {"right": [True] * 7, "compiled": True}


if __name__ == "__main__":
    print(json.dumps(run_calls("cpu")))
