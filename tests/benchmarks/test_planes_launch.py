"""benchmarks/planes_launch.py: without a GPU it says so in one line; on CUDA its launch-before-a-linear
timing runs every variant and each is a positive time (the numbers themselves: BENCHMARKS.md)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import planes_launch  # noqa: E402

from anybit.kernels import triton_bmma  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message")
def test_planes_launch_without_a_gpu_exits_with_one_line(capsys):
    assert planes_launch.main(["--before-linear", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["planes_launch.py: error: needs a CUDA GPU"]


@pytest.mark.skipif(not (torch.cuda.is_available() and triton_bmma.available()), reason="needs CUDA and Gluon")
def test_cuda_before_linear_times_every_variant():
    results = planes_launch.time_before_linear([(48, 700, "3"), (40, 300, "3.25")])
    assert list(results) == ["48x700 3", "40x300 3.25"]
    for row in results.values():
        assert list(row) == ["alone", "empty launch", "load-and-reduce launch", "x_planes", "as a call"]
        assert all(v > 0 for v in row.values())
