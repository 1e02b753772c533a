"""benchmarks/call_overhead.py: without a GPU it says so in one line; on CUDA every row of its table is
measured (the numbers themselves: BENCHMARKS.md)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import call_overhead  # noqa: E402

from anybit.kernels import triton_bmma  # noqa: E402

ON_GPU = torch.cuda.is_available() and triton_bmma.available()


@pytest.mark.skipif(ON_GPU, reason="the no-GPU message")
def test_call_overhead_without_a_gpu_exits_with_one_line(capsys):
    assert call_overhead.main(["--out", "unused"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "call_overhead.py: error: needs a CUDA GPU and Triton with Gluon"]


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA and Gluon")
def test_cuda_call_overhead_measures_every_row(monkeypatch):
    monkeypatch.setattr(call_overhead, "CALLS", 20)
    rows = call_overhead.measure("3.25", size=512)
    assert len(rows) == 15 and all(v > 0 for v in rows.values())
