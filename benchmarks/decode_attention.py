"""One-query attention for the decoding harness (``decode.py``), the same for every variant.

A decoding step attends one query per head to the positions filled so far. PyTorch's
``scaled_dot_product_attention`` with the static cache's mask runs a prefill kernel (cuDNN's flash
forward) over all ``--max-len`` positions, and the step's key and value go into the cache by two
more launches (``index_copy_``): ~13 us a block on the H100, a fifth of a quantized step. Here one
Triton launch a layer writes the new key and value into the cache and attends over positions
0..pos only (as inference engines do), split-KV ("flash decoding"): a program per (head, block of
BLOCK_N cached positions, row of the batch) computes its block's softmax partials in fp32, and the
last program of a head to finish combines them (a ticket), so no second launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope(x_ptr, d, cos_row, sin_row, ROPE: tl.constexpr, D: tl.constexpr):
    """fp32 x[d], rotated as LLaMA's rotary embedding does (``rotate_half``: the partner of d is d
    +- D / 2, negated in the first half) when ROPE."""
    x = tl.load(x_ptr + d).to(tl.float32)
    if ROPE:
        partner = tl.load(x_ptr + (d + D // 2) % D).to(tl.float32)
        partner = tl.where(d < D // 2, -partner, partner)
        x = x * tl.load(cos_row + d).to(tl.float32) + partner * tl.load(sin_row + d).to(tl.float32)
    return x


@triton.jit
def _decode_attention_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, part_ptr, ticket_ptr,
                             cos_ptr, sin_ptr, scale, stride_qb, stride_qh, stride_nb, stride_nh, stride_vb, stride_vh,
                             stride_cb, stride_ch, stride_cn, stride_ob, stride_rb, stride_rn,
                             GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                             ROPE: tl.constexpr):
    """Program (head, split, row of the batch): cached positions [split * BLOCK_N, +BLOCK_N) below
    pos (split 0 also the new key), its softmax partials (max, sum, D weighted values) into
    ``part``; the last program of the head to take its ticket combines them and resets the ticket.
    ROPE: q and the new key are rotated here (cos, sin: a batch row of stride_rb, the position's row
    of stride_rn: 0 when given for this position only)."""
    h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    H = tl.num_programs(0)
    kvh = h // GROUP
    d = tl.arange(0, D)
    pos = tl.load(pos_ptr)
    cos_row = cos_ptr + b * stride_rb + pos * stride_rn
    sin_row = sin_ptr + b * stride_rb + pos * stride_rn
    q = _rope(q_ptr + b * stride_qb + h * stride_qh, d, cos_row, sin_row, ROPE, D) * scale
    kc = kc_ptr + b * stride_cb + kvh * stride_ch
    vc = vc_ptr + b * stride_cb + kvh * stride_ch
    if split == 0:  # the new key and value start split 0's partials (a finite max for the combination)
        kn = _rope(kn_ptr + b * stride_nb + kvh * stride_nh, d, cos_row, sin_row, ROPE, D).to(kc_ptr.dtype.element_ty)
        vn = tl.load(vn_ptr + b * stride_vb + kvh * stride_vh + d)
        if h % GROUP == 0:  # one program of the kv head writes them; no program reads position pos back
            tl.store(kc + pos * stride_cn + d, kn)
            tl.store(vc + pos * stride_cn + d, vn)
        m = tl.sum(kn.to(tl.float32) * q, axis=0)
        total = m * 0.0 + 1.0
        acc = vn.to(tl.float32)
    else:
        total = tl.sum(q * 0.0, axis=0)
        m = total - float("inf")
        acc = q * 0.0
    start = split * BLOCK_N
    if start < pos:
        n = start + tl.arange(0, BLOCK_N)
        valid = n < pos
        k = tl.load(kc + n[:, None] * stride_cn + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(vc + n[:, None] * stride_cn + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        total = total * alpha + tl.sum(p, axis=0)
        m = m_new
    slot = part_ptr + ((b * H + h) * SPLITS + split) * (D + 2)
    tl.store(slot + d, acc)
    tl.store(slot + D, m)
    tl.store(slot + D + 1, total)
    tl.debug_barrier()  # every thread's partials stored before the ticket (released with it)
    ticket = tl.atomic_add(ticket_ptr + b * H + h, 1)
    if ticket == SPLITS - 1:
        base = part_ptr + (b * H + h) * SPLITS * (D + 2)
        sp = tl.arange(0, SPLITS)
        ms = tl.load(base + sp * (D + 2) + D, cache_modifier=".cg")
        top = tl.max(ms, axis=0)
        w = tl.exp(ms - top)  # empty splits: max -inf, weight 0
        totals = tl.load(base + sp * (D + 2) + D + 1, cache_modifier=".cg")
        accs = tl.load(base + sp[:, None] * (D + 2) + d[None, :], cache_modifier=".cg")
        out = tl.sum(accs * w[:, None], axis=0) / tl.sum(totals * w, axis=0)
        tl.store(o_ptr + b * stride_ob + h * D + d, out.to(o_ptr.dtype.element_ty))
        tl.atomic_xchg(ticket_ptr + b * H + h, 0)


_WORKSPACES: dict = {}


def _workspace(device, b: int, heads: int, splits: int, d: int):
    """fp32 partials and zeroed int32 tickets, kept per device and shape (made before a CUDA graph
    captures the step: its warm-up steps call this first); the kernel leaves the tickets zero."""
    key = (str(device), b, heads, splits, d)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.empty(b * heads * splits * (d + 2), dtype=torch.float32, device=device),
                            torch.zeros(b * heads, dtype=torch.int32, device=device))
    return _WORKSPACES[key]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor | None = None,
                     sin: torch.Tensor | None = None, block_n: int = 32, warps: int = 2) -> torch.Tensor:
    """Attention of one new position: q (b, heads, 1, d), its key and value k, v (b, kv_heads, 1, d)
    are written into the caches (b, kv_heads, max_len, d) at ``pos`` (a 0-d device tensor) and q
    attends to positions 0..pos (scale 1 / sqrt(d), kv heads shared by heads // kv_heads heads).
    With ``cos``, ``sin`` (b or 1, n, d), the rotary embedding, q and k are rotated first
    (``apply_rotary_pos_emb``), in the same launch: n = 1, that of this position; n > 1, a table
    of every position (row pos is read: no launch a step to make them).
    Returns (b, 1, heads * d), the layout o_proj reads. The cached positions are split over
    max_len / ``block_n`` programs a head (those past pos return at once), ``warps`` a program:
    ``python benchmarks/decode_attention.py`` times the choices."""
    b, heads, _, d = q.shape
    kv_heads = k.shape[1]
    if not (q.stride(-1) == k.stride(-1) == v.stride(-1) == k_cache.stride(-1) == 1):
        raise ValueError("decode_attention needs unit stride along the head dimension")
    if k_cache.stride() != v_cache.stride() or heads % kv_heads:
        raise ValueError("decode_attention: caches of one layout, heads a multiple of the kv heads")
    splits = triton.next_power_of_2(triton.cdiv(k_cache.shape[2], block_n))
    part, tickets = _workspace(q.device, b, heads, splits, d)
    out = torch.empty(b, 1, heads * d, dtype=q.dtype, device=q.device)
    rope = cos is not None
    if rope:
        if cos.shape != sin.shape or cos.dim() != 3 or cos.stride(-1) != 1 or cos.stride() != sin.stride():
            raise ValueError("decode_attention: cos and sin of one (b or 1, positions, d) layout")
    _decode_attention_kernel[(heads, splits, b)](
        q, k, v, k_cache, v_cache, pos, out, part, tickets, cos if rope else q, sin if rope else q, d ** -0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), out.stride(0), cos.stride(0) if rope and cos.shape[0] > 1 else 0,
        cos.stride(1) if rope and cos.shape[1] > 1 else 0,
        GROUP=heads // kv_heads, D=d, BLOCK_N=block_n, SPLITS=splits, ROPE=rope, num_warps=warps)
    return out


def main(argv=None) -> int:
    """Time the kernel (``--configs`` of BLOCK_N,warps) against torch's path (two ``index_copy_`` and
    SDPA over the masked cache) for LLaMA-2-7B's attention at several positions: each a CUDA graph
    of one call per layer (32 caches, 4 MB each: more than L2), replay timed by do_bench (median)."""
    import argparse
    import json
    import os
    import sys

    import torch.nn.functional as F

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--positions", default="16,64,128,200,255")
    ap.add_argument("--configs", default="32,2;32,4;64,4;16,2")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    layers, heads, d, max_len = 32, 32, 128, 256
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float16)

    kc, vc = rand(layers, 1, heads, max_len, d), rand(layers, 1, heads, max_len, d)
    q, k, v = rand(1, heads, 1, d), rand(1, heads, 1, d), rand(1, heads, 1, d)
    pos = torch.zeros((), dtype=torch.long, device="cuda")
    positions = torch.arange(max_len, device="cuda")

    def torch_path(i):
        kc[i].index_copy_(2, pos.view(1), k)
        vc[i].index_copy_(2, pos.view(1), v)
        visible = (positions <= pos).view(1, 1, 1, -1)
        return F.scaled_dot_product_attention(q, kc[i], vc[i], attn_mask=visible)

    def timed_us(call):
        call(0)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(layers):
                call(i)
        return triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median") * 1e3 / layers

    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")]
    rows = []
    for p in (int(x) for x in args.positions.split(",")):
        pos.fill_(p)
        row = {"position": p, "torch_us": round(timed_us(torch_path), 2)}
        for bn, w in configs:
            row[f"triton_{bn}_{w}_us"] = round(timed_us(
                lambda i, bn=bn, w=w: decode_attention(q, k, v, kc[i], vc[i], pos, block_n=bn, warps=w)), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "command": "python benchmarks/decode_attention.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_attention.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
