"""The decoding harness's one-query attention kernel (benchmarks/decode_attention.py) against torch's
attention over the masked cache, and the cache it writes. Runs under Triton's interpreter in a
subprocess on the CPU, and compiled on CUDA when there is a GPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":  # the interpreter worker
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "kernels"), str(ROOT)]
from interpreted import worker_results  # noqa: E402

pytest.importorskip("triton")
from decode_attention import decode_attention  # noqa: E402

CASES = [(1, 4, 4, 16, 0), (2, 4, 2, 16, 5), (1, 8, 2, 32, 70)]  # (batch, heads, kv heads, head dim, position)
MAX_LEN = 80


def case_errors(b, heads, kv_heads, d, pos, device="cpu"):
    gen = torch.Generator().manual_seed(pos + heads)
    dt = torch.float16 if device == "cuda" else torch.float32

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dt)

    q, k, v = rand(b, heads, 1, d), rand(b, kv_heads, 1, d), rand(b, kv_heads, 1, d)
    k_cache, v_cache = rand(b, kv_heads, MAX_LEN, d), rand(b, kv_heads, MAX_LEN, d)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k[:, :, pos], want_v[:, :, pos] = k[:, :, 0], v[:, :, 0]
    group = heads // kv_heads
    visible = (torch.arange(MAX_LEN, device=device) <= pos).view(1, 1, 1, -1)
    want = F.scaled_dot_product_attention(q.float(), want_k.repeat_interleave(group, 1).float(),
                                          want_v.repeat_interleave(group, 1).float(), attn_mask=visible)
    got = decode_attention(q, k, v, k_cache, v_cache, torch.tensor(pos, device=device))
    want = want.transpose(1, 2).reshape(b, 1, heads * d)
    result = {"out": float((got.float() - want).norm() / want.norm()),
              "cache_exact": bool(torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v))}
    # with the rotary embedding in the launch: the same as rotating first
    cos, sin = rand(1, 1, d), rand(1, 1, d)
    cos[..., d // 2:], sin[..., d // 2:] = cos[..., : d // 2], sin[..., : d // 2]
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    k2, v2 = want_k.clone(), want_v.clone()
    plain = decode_attention(q_rot, k_rot, v, k2, v2, torch.tensor(pos, device=device))
    k3, v3 = want_k.clone(), want_v.clone()
    fused = decode_attention(q, k, v, k3, v3, torch.tensor(pos, device=device), cos, sin)
    result["rope_out"] = float((fused.float() - plain.float()).norm() / plain.float().norm())
    result["rope_cache"] = float((k3.float() - k2.float()).abs().max())
    # the same rotation read from a table of every position at row pos (other rows are noise)
    cos_table, sin_table = rand(1, MAX_LEN, d), rand(1, MAX_LEN, d)
    cos_table[:, pos], sin_table[:, pos] = cos[:, 0], sin[:, 0]
    k4, v4 = want_k.clone(), want_v.clone()
    table = decode_attention(q, k, v, k4, v4, torch.tensor(pos, device=device), cos_table, sin_table)
    result["table_same"] = bool(torch.equal(table, fused) and torch.equal(k4, k3))
    return result


@pytest.fixture(scope="module")
def interpreted_errors():
    return worker_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_over_filled_positions_matches_masked_sdpa(interpreted_errors, case):
    r = interpreted_errors[str(case)]
    assert r["cache_exact"] and r["out"] < 1e-5
    assert r["rope_out"] < 1e-5 and r["rope_cache"] < 1e-5 and r["table_same"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_cuda(case):
    r = case_errors(*case, device="cuda")
    assert r["cache_exact"] and r["out"] < 1e-3
    assert r["rope_out"] < 2e-3 and r["rope_cache"] < 2e-2  # fp16: rotated once in fp32 against twice rounded
    assert r["table_same"]


if __name__ == "__main__":
    print(json.dumps({str(c): case_errors(*c) for c in CASES}))
