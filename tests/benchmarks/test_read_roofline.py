"""The read roofline's kernel (benchmarks/read_roofline.py) reads every word it is given, once: the
XOR of its per-program results is the XOR of the whole buffer for sizes that fill no program evenly.
Runs under Triton's interpreter in a subprocess on the CPU, and compiled on CUDA when there is a GPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":  # the interpreter worker
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "kernels")]
from interpreted import worker_results  # noqa: E402

pytest.importorskip("triton")
from read_roofline import CONFIGS, read_roofline_us, streaming_read  # noqa: E402

SIZES = [1, 1023, 4096 + 5, 3 * 2048 * 2 + 7]


def xor_all(t: torch.Tensor) -> int:
    v = t.to(torch.int64) & 0xFFFFFFFF
    out = 0
    for w in v.tolist():
        out ^= w
    return out


def case_results(device="cpu"):
    gen = torch.Generator().manual_seed(3)
    results = {}
    for n in SIZES:
        words = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, generator=gen).to(device)
        for block, rows, warps in CONFIGS:
            got = streaming_read(words, (block, rows, warps)).cpu()
            results[f"{n} {(block, rows, warps)}"] = {"programs": got.numel(), "want_programs": -(-n // (block * rows)),
                                                      "xor": xor_all(got), "want_xor": xor_all(words.cpu())}
    return results


def check(results):
    for key, r in results.items():
        assert r["programs"] == r["want_programs"], key
        assert r["xor"] == r["want_xor"], key


@pytest.fixture(scope="module")
def interpreted_results():
    return worker_results(__file__)


def test_streaming_read_reads_every_word_once(interpreted_results):
    check(interpreted_results)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streaming_read_cuda_and_its_timing():
    check(case_results("cuda"))
    calls = []

    def bench_calls(fns, device):
        calls.append(len(fns))
        for f in fns:
            f()
        return 1.0

    us, cfg = read_roofline_us(1 << 20, "cuda", bench_calls, lambda nbytes, device: 3)
    assert cfg in CONFIGS and us == 1000.0 and calls == [3] * len(CONFIGS)


if __name__ == "__main__":
    print(json.dumps(case_results()))
