"""What one launch that only reads a given number of bytes achieves: the floor of a memory-bound call
of that size, beside the 1 GiB copy bandwidth that issue #5's targets are stated against.

A call reading tens of MB pays fixed costs a 1 GiB copy does not see: the launch, the first
requests' DRAM latency, and the last programs' drain. ``streaming_read`` reads every 32-bit word of
a buffer once (coalesced, 16 bytes a thread and load) and writes one word per program, so its time
in ``kernel_speed.py``'s harness is what any kernel moving that many bytes at best costs there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (words a row, rows, warps) of a program; the fastest differs by size (H100: 1024 x 1 x 4 from
# ~8 to 60 MB, larger programs above)
CONFIGS = [(1024, 1, 4), (512, 4, 4), (1024, 2, 4), (2048, 2, 8)]


@triton.jit
def _streaming_read_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * (BLOCK * ROWS) + tl.arange(0, ROWS)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    v = tl.load(src_ptr + offs, mask=offs < n, other=0)
    # the XOR of what was read: a result that depends on every word, so no load can be dropped
    tl.store(dst_ptr + pid, tl.xor_sum(tl.xor_sum(v, 1), 0))


def streaming_read(words: torch.Tensor, config=CONFIGS[0], out: torch.Tensor | None = None) -> torch.Tensor:
    """Read every element of the int32 tensor ``words`` once; returns one XOR per program (``out``:
    at least that many int32, reused when given)."""
    block, rows, warps = config
    n = words.numel()
    grid = triton.cdiv(n, block * rows)
    if out is None:
        out = torch.empty(grid, dtype=torch.int32, device=words.device)
    _streaming_read_kernel[(grid,)](words, out, n, BLOCK=block, ROWS=rows, num_warps=warps)
    return out[:grid]


def read_roofline_us(nbytes: int, device, bench_calls, n_buffers) -> tuple[float, tuple]:
    """(us, config): the fastest of ``CONFIGS`` reading ``nbytes`` (whole words), each call on its own
    buffer, over ``n_buffers(nbytes, device)`` buffers, timed by ``bench_calls(calls, device)`` (ms a
    call): ``kernel_speed.py``'s rotation and timing of the kernels themselves."""
    n = max(1, nbytes // 4)
    gen = torch.Generator(device=device).manual_seed(0)
    bufs = [torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, device=device, generator=gen)
            for _ in range(n_buffers(4 * n, device))]
    out = torch.empty(triton.cdiv(n, min(b * r for b, r, _ in CONFIGS)), dtype=torch.int32, device=device)
    timed = [(1e3 * bench_calls([lambda b=b, c=c: streaming_read(b, c, out) for b in bufs], device), c)
             for c in CONFIGS]
    return min(timed)
