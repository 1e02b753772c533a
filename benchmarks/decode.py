"""Decoding speed: tokens/s at batch 1 for a LLaMA-2-7B-shaped model, fp16 vs anybit.

    python benchmarks/decode.py --device cuda                 # fp16, anybit 4 / 3.25 / 2.25 bits
    python benchmarks/decode.py --smoke                       # tiny model on the CPU
    python benchmarks/decode.py --device cuda --profile       # also each variant's kernels, time per call
    python benchmarks/decode.py --device cuda --budgets --grids affine-g128-3 cols-3.25   # gptq g128, cmpq layouts

One harness for every variant: ``StaticDecoder`` runs a Llama model's own modules one token at
a time against a static KV cache (``--max-len`` positions), so a whole step -- embedding, 32
blocks, head, greedy pick of the next token -- has fixed shapes and no host synchronisation and is
captured once in a CUDA graph; decoding replays it. Attention (``--attention``, one choice for all
variants): on CUDA by default ``decode_attention.py``'s kernel, which applies the rotary
embedding (read from a table of every position's, made once), writes the step's key and value
into the cache and reads the filled positions only, in one launch, as inference engines do;
``sdpa`` is the rotary embedding made each step and applied by compiled code, two cache-write
launches and torch's attention over the whole cache with a mask (a prefill kernel).
Only the decoder blocks' linears change between variants: ``nn.Linear`` in fp16, or
``AnybitLinear`` holding packed random codes and fp16 per-row codebooks (anybit's checkpoint
layout; the numbers in them do not change the speed). Mixed budgets are rows of two widths:
3.25 = 75% 3-bit + 25% 4-bit rows, 2.25 = 75% 2-bit + 25% 3-bit; the honest bits per weight
reported count codes, codebooks and the per-row width table. Each anybit variant's first step
is checked against the pure-torch reference path of the same weights, and the fused step
against the plain one. The headline tokens/s is the CUDA graph of the step whose glue between
linears (residual add + RMSNorm, rotary, SiLU-and-multiply) torch.compile fused; the graph of
the plain step and the step launched from Python are reported beside it. The fused step also
computes the linears that read one input as one stacked matrix (q/k/v, gate/up: 7 linear calls a
block become 4), for fp16 (``nn.Linear`` of the concatenated weights) and anybit
(``AnybitLinear.stacked``) alike, as inference engines do. Where anybit's binary tensor-core kernel
runs, the anybit fused step's residual add + RMSNorm and SiLU-and-multiply are anybit's own fused
ops (``anybit.kernels.xplanes``: one launch each, as the compiled glue, that also writes the bit
planes the linear after it reads), so that only o_proj makes its planes in a launch of its own.
On a GPU where the tensor-core kernels run, ``AnybitLinear`` keeps the codes of its blocks of up
to 4 bits in their tiled order only (after its first forward): "resident_gib" is what the block
linears then hold, "block_linear_gib" the stored (checkpoint) size.
On CUDA the fp16 model is timed first and again after the anybit variants (the same GPU state on
both sides of them), and each "x fp16" is against the faster of the two.
``--grids`` adds whole models in other layouts of ``random_llama.LAYOUTS`` (affine grids, per-column
codebooks: ``anybit.kernels.triton_grid``, turned on for the run); their q/k/v and gate/up are stacked where
the layout allows it (not per-column codebooks) and their glue is torch.compile's (no bit planes).
Writes ``decode.json`` and ``decode.md`` to --out (default $OUT or the current directory).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

from random_llama import LAYOUTS, MIXES, random_llama, random_lut_block, random_row_widths, random_weight  # noqa: E402

from anybit.fileio import write_file_atomic  # noqa: E402
from anybit.formats.packed import LinearSpec, codes_name, lut_name  # noqa: E402
from anybit.kernels import tiled_codes_supported  # noqa: E402
from anybit.models import decoder_blocks  # noqa: E402
from anybit.nn import AnybitLinear  # noqa: E402



def rms_norm(h, weight, eps: float):
    """LlamaRMSNorm's arithmetic: in fp32, cast back, then the weight."""
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def add_rms_norm(h, delta, weight, eps: float):
    """The residual add and the next norm: one fused kernel once compiled."""
    h = h + delta
    return h, rms_norm(h, weight, eps)


def swiglu(gate, up):
    return F.silu(gate) * up


def stack_linears(linears) -> nn.Module:
    """One module for linears that read the same input, its output their outputs in turn: an
    ``nn.Linear`` of the concatenated weights, or ``AnybitLinear.stacked``."""
    if all(isinstance(m, AnybitLinear) for m in linears):
        return AnybitLinear.stacked(linears)
    if not all(type(m) is nn.Linear for m in linears):
        raise ValueError("stack_linears: nn.Linear or AnybitLinear modules, not a mix")
    w = linears[0].weight
    stacked = nn.Linear(w.shape[1], sum(m.out_features for m in linears), bias=linears[0].bias is not None,
                        device=w.device, dtype=w.dtype)
    with torch.no_grad():
        stacked.weight.copy_(torch.cat([m.weight for m in linears]))
        if stacked.bias is not None:
            stacked.bias.copy_(torch.cat([m.bias for m in linears]))
    return stacked


def stackable(m) -> bool:
    """Whether ``stack_linears`` can join m with the linears that read its input (per-column codebooks
    belong to one matrix: ``qweight.stack_rows``)."""
    return not (isinstance(m, AnybitLinear) and m.spec.column_codebooks)


class StaticDecoder:
    """Greedy one-token decoding steps of a Hugging Face Llama model with a static KV cache.

    The step calls the model's own embedding, linears, rotary embedding and head; the glue between
    linears (residual add + RMSNorm, rotary, SiLU-and-multiply) is written out here with the same
    arithmetic so that, with ``fuse``, ``torch.compile`` can fuse each piece into one kernel: an
    eager Llama step launches ~40 small kernels per block, which cost as much time as the weights
    of a quantized model take to read. The linears themselves are never compiled; with ``fuse``
    the ones that share an input run stacked (``stack``, by default as ``fuse``; ``stack_linears``:
    one call for q/k/v, one for gate/up).
    """

    def __init__(self, model, max_len: int, batch: int = 1, fuse: bool = False, stack: bool | None = None,
                 planes: bool | None = None, attention: str = "sdpa"):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cfg = model.config
        if cfg.hidden_act != "silu":
            raise ValueError(f"StaticDecoder computes SwiGLU with SiLU, the model uses {cfg.hidden_act}")
        wrap = (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if fuse else (lambda f: f)
        self.norm, self.add_norm, self.swiglu, self.rope = map(wrap, (rms_norm, add_rms_norm, swiglu,
                                                                       apply_rotary_pos_emb))
        self.model = model
        p = next(model.parameters())
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (len(decoder_blocks(model)), batch, self.kv_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.arange(max_len, device=p.device)
        self.pos = torch.zeros((), dtype=torch.long, device=p.device)  # the next position to write
        self.token = torch.zeros(batch, dtype=torch.long, device=p.device)  # the next input token
        self.logits = None
        self.qkv = self.gate_up = None
        if attention not in ("sdpa", "triton"):
            raise ValueError(f"attention is 'sdpa' or 'triton', not {attention!r}")
        self.attention = attention
        if attention == "triton":
            from decode_attention import decode_attention

            self.decode_attention = decode_attention
            # the kernel reads row pos of a table of every position's rotary embedding, made once here (the
            # same numbers the step's rotary_emb call makes: an outer product and cos / sin, elementwise)
            self.rope_table = model.model.rotary_emb(torch.zeros(1, dtype=p.dtype, device=p.device),
                                                     self.positions.view(1, -1))
        linears = [m for _, _, m in block_linears(model)]
        # anybit's own fused glue: the residual add + RMSNorm and SiLU-and-multiply also write the bit
        # planes of their output, which the binary tensor-core kernel reads (no launch of its own)
        self.planes = (fuse and all(isinstance(m, AnybitLinear) and m.spec.row_codebooks for m in linears)
                       and tiled_codes_supported(p.device)
                       if planes is None else planes)
        if self.planes:
            from anybit.kernels import xplanes

            self.norm_planes, self.silu_mul_planes = xplanes.add_rms_norm_planes, xplanes.silu_mul_planes
        if fuse and all(stackable(m) for m in linears) if stack is None else stack:
            layers = model.model.layers
            self.qkv = [stack_linears([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]) for l in layers]
            self.gate_up = [stack_linears([l.mlp.gate_proj, l.mlp.up_proj]) for l in layers]

    def reset(self, token: int = 1) -> None:
        self.pos.zero_()
        self.token.fill_(token)

    def _norm(self, h, delta, norm):
        """(h + delta, its RMSNorm, their bit planes or None); delta None: h is the sum."""
        if self.planes:
            return self.norm_planes(h, delta, norm.weight, norm.variance_epsilon)
        if delta is None:
            return h, self.norm(h, norm.weight, norm.variance_epsilon), None
        return *self.add_norm(h, delta, norm.weight, norm.variance_epsilon), None

    def _swiglu(self, gate, up):
        """(SiLU(gate) * up, its bit planes or None)."""
        return self.silu_mul_planes(gate, up) if self.planes else (self.swiglu(gate, up), None)

    @staticmethod
    def _linear(module, x, planes):
        return module(x) if planes is None else module(x, planes=planes)

    def _attention(self, i: int, attn, x, planes, cos, sin, visible):
        b = x.shape[0]
        if self.qkv is not None:
            kv = self.kv_heads * self.head_dim
            q, k, v = self._linear(self.qkv[i], x, planes).split([self.heads * self.head_dim, kv, kv], -1)
        else:
            q, k, v = (self._linear(m, x, planes) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        q = q.view(b, 1, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.attention == "triton":  # rotates q and k, writes k and v into the cache, attends: one launch
            return attn.o_proj(self.decode_attention(q, k, v, self.k[i], self.v[i], self.pos, cos, sin))
        q, k = self.rope(q, k, cos, sin)
        self.k[i].index_copy_(2, self.pos.view(1), k)
        self.v[i].index_copy_(2, self.pos.view(1), v)
        keys, values = self.k[i], self.v[i]
        if self.kv_heads != self.heads:
            keys = keys.repeat_interleave(self.heads // self.kv_heads, 1)
            values = values.repeat_interleave(self.heads // self.kv_heads, 1)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
        return attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Feed ``self.token`` at ``self.pos``; leave the greedy next token in ``self.token``."""
        m = self.model.model
        h = m.embed_tokens(self.token)[:, None, :]
        if self.attention == "triton":
            cos, sin, visible = *self.rope_table, None
        else:
            cos, sin = m.rotary_emb(h, self.pos.view(1, 1))
            visible = (self.positions <= self.pos).view(1, 1, 1, -1)
        delta = None
        for i, layer in enumerate(m.layers):
            h, a, planes = self._norm(h, delta, layer.input_layernorm)
            delta = self._attention(i, layer.self_attn, a, planes, cos, sin, visible)
            h, a, planes = self._norm(h, delta, layer.post_attention_layernorm)
            mlp = layer.mlp
            if self.gate_up is not None:
                gate, up = self._linear(self.gate_up[i], a, planes).chunk(2, -1)
            else:
                gate, up = self._linear(mlp.gate_proj, a, planes), self._linear(mlp.up_proj, a, planes)
            delta = self._linear(mlp.down_proj, *self._swiglu(gate, up))
        h, a = self.add_norm(h, delta, m.norm.weight, m.norm.variance_epsilon)
        logits = self.model.lm_head(a)[:, 0]
        self.token.copy_(logits.argmax(-1))
        self.pos.add_(1)
        return logits


def capture(decoder: StaticDecoder):
    """Warm up (compiles the kernels), then capture one step in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            decoder.reset()
            decoder.step()
    torch.cuda.current_stream().wait_stream(stream)
    decoder.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decoder.logits = decoder.step()
    return graph


def tokens_per_s(run_step, decoder: StaticDecoder, steps: int, repeats: int, cuda: bool) -> float:
    best = 0.0
    for _ in range(repeats):
        decoder.reset()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            run_step()
        if cuda:
            torch.cuda.synchronize()
        best = max(best, steps * decoder.token.numel() / (time.perf_counter() - t0))
    return best


def random_anybit_linear(out_f: int, in_f: int, mix: dict[int, float], device, gen: torch.Generator) -> AnybitLinear:
    """An AnybitLinear (out_f x in_f): rows of the widths in ``mix``, random codes and sorted
    random fp16 codebooks."""
    widths = random_row_widths(out_f, mix, gen)
    blocks = {b: (int((widths == b).sum()), in_f) for b in mix if int((widths == b).sum())}
    module = AnybitLinear(LinearSpec("lut", out_f, in_f, blocks), device=device)
    for bits, (rows, _) in blocks.items():
        codes, lut = random_lut_block(rows, in_f, bits, device, gen=gen)
        setattr(module, codes_name(bits), codes)
        setattr(module, lut_name(bits), lut)
    if len(blocks) > 1:
        module.widths = widths.to(device)
    return module


def block_linears(model):
    """(block, qualified name, module) of every decoder-block linear, nn.Linear or AnybitLinear."""
    for block in decoder_blocks(model):
        for name, m in list(block.named_modules()):
            if isinstance(m, (nn.Linear, AnybitLinear)):
                yield block, name, m


def stored_bytes(m) -> int:
    """Bytes a block linear keeps: its packed tensors, or its fp16 weight."""
    tensors = m.packed().values() if isinstance(m, AnybitLinear) else [m.weight]
    return sum(t.numel() * t.element_size() for t in tensors)


def to_anybit(model, mix: dict[int, float], seed: int = 0) -> None:
    """Replace every decoder-block linear (nn.Linear or an earlier AnybitLinear) by a random packed
    AnybitLinear, in place."""
    gen = torch.Generator().manual_seed(seed)
    for block, name, m in block_linears(model):
        device = next(m.buffers()).device if isinstance(m, AnybitLinear) else m.weight.device
        block.set_submodule(name, random_anybit_linear(m.out_features, m.in_features, mix, device, gen))


def to_layout(model, layout: str, seed: int = 0) -> None:
    """Replace every decoder-block linear by an AnybitLinear of ``random_llama.LAYOUTS``' ``layout`` (random
    values, one weight a shape, each linear its own copy), in place."""
    gen = torch.Generator().manual_seed(seed)
    made = {}
    for block, name, m in block_linears(model):
        device = next(m.buffers()).device if isinstance(m, AnybitLinear) else m.weight.device
        shape = (m.out_features, m.in_features)
        if shape not in made:
            made[shape] = AnybitLinear.from_quantized(random_weight(layout, *shape, gen)).to(device)
        block.set_submodule(name, copy.deepcopy(made[shape]))


def honest_bits(model) -> float:
    """Stored bits per weight of the block linears (all AnybitLinear)."""
    linears = [m for _, _, m in block_linears(model)]
    return 8 * sum(map(stored_bytes, linears)) / sum(m.in_features * m.out_features for m in linears)


def linear_bytes(model) -> int:
    return sum(stored_bytes(m) for _, _, m in block_linears(model))


def measure(model, args, cuda: bool) -> dict:
    """Tokens/s three ways: CUDA graph of the step with its glue fused by torch.compile (the
    headline), CUDA graph of the plain step, and the plain step launched from Python."""
    row = {}
    if cuda:
        for fuse, key in ((True, "tokens_per_s"), (False, "tokens_per_s_graph_unfused")):
            decoder = StaticDecoder(model, args.max_len, fuse=fuse, attention=args.attention)
            graph = capture(decoder)
            row[key] = round(tokens_per_s(graph.replay, decoder, args.steps, args.repeats, cuda), 1)
            del graph, decoder
    decoder = StaticDecoder(model, args.max_len, attention=args.attention)
    row["tokens_per_s_eager"] = round(tokens_per_s(decoder.step, decoder, args.eager_steps, args.repeats, cuda), 1)
    row.setdefault("tokens_per_s", row["tokens_per_s_eager"])
    return row


def _set_kernels_env(value: str | None) -> None:
    if value is None:
        os.environ.pop("ANYBIT_KERNELS", None)
    else:
        os.environ["ANYBIT_KERNELS"] = value


@contextlib.contextmanager
def kernels_env(value: str | None):
    """ANYBIT_KERNELS set to ``value`` (None: unset) inside, restored after (the linears' cached
    kernel operands follow the setting)."""
    old = os.environ.get("ANYBIT_KERNELS")
    _set_kernels_env(value)
    try:
        yield
    finally:
        _set_kernels_env(old)


def resident_bytes(model) -> int:
    """Bytes the block linears hold on their device now: every buffer (AnybitLinear keeps the codes
    of its blocks of up to 4 bits in the kernels' tiled order after its first GPU forward, padded to
    whole tiles, with their subset coefficients) or the fp16 weight."""
    return sum(sum(t.numel() * t.element_size() for t in (m.buffers() if isinstance(m, AnybitLinear) else [m.weight]))
               for _, _, m in block_linears(model))


def first_step_logits(model, args, fuse: bool = False, reference: bool = False) -> torch.Tensor:
    decoder = StaticDecoder(model, args.max_len, fuse=fuse, attention=args.attention)
    decoder.reset()
    if not reference:
        return decoder.step().float()
    # the pure-torch path: each linear decodes its whole weight, one dense matmul
    with kernels_env("reference"):
        return decoder.step().float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def kernel_table(fn, cuda: bool, top: int = 15):
    """fn's result and its ``top`` kernels by total time under torch.profiler (on the CPU: ops),
    each with its calls and time per call. CUPTI sees the kernels that CUDA graph replays launch,
    so the graph steps are included; the profiler slows them a little."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        out = fn()
    stats = [(e.key, e.count, e.device_time_total if cuda else e.self_cpu_time_total) for e in prof.key_averages()]
    stats = sorted((s for s in stats if s[1] and s[2] > 0), key=lambda s: -s[2])[:top]
    return out, [{"kernel": k[:120], "calls": c, "total_ms": round(t / 1e3, 3), "us_per_call": round(t / c, 2)}
                 for k, c, t in stats]


def step_timeline(model, args) -> dict:
    """Where one step of the headline graph spends its time: the kernels of one replay (CUPTI
    timestamps) by name, each with its launches and mean duration, and the step's span from the
    first kernel's start to the last one's end split into kernel time and the idle time between
    launches (a graph still waits ~1 us between dependent kernels, and a launch ramps up and drains)."""
    from torch.profiler import ProfilerActivity, profile

    decoder = StaticDecoder(model, args.max_len, fuse=True, attention=args.attention)
    graph = capture(decoder)
    decoder.reset()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    del graph, decoder
    by_name: dict = {}
    for start, end, name in spans:
        calls, total = by_name.get(name[:80], (0, 0.0))
        by_name[name[:80]] = (calls + 1, total + end - start)
    busy = sum(end - start for start, end, _ in spans)
    wall = spans[-1][1] - spans[0][0]
    # one decoder block, from one attention launch to the next, each launch's duration and the idle
    # time before it averaged over the blocks (the same launches in the same order in each)
    starts = [i for i, s in enumerate(spans) if "attention" in s[2]]
    blocks = [spans[i - 1:j] for i, j in zip(starts, starts[1:])]
    block = []
    if blocks and all([s[2] for s in b] == [s[2] for s in blocks[0]] for b in blocks):
        for k in range(1, len(blocks[0])):
            block.append({"kernel": blocks[0][k][2][:60],
                          "us": round(sum(b[k][1] - b[k][0] for b in blocks) / len(blocks), 2),
                          "idle_before_us": round(sum(b[k][0] - b[k - 1][1] for b in blocks) / len(blocks), 2)})
    return {"launches": len(spans), "span_us": round(wall, 1), "kernel_us": round(busy, 1),
            "idle_us": round(wall - busy, 1), "idle_us_per_launch": round((wall - busy) / max(len(spans) - 1, 1), 2),
            "block": block,
            "kernels": [{"kernel": k, "calls": c, "us_per_call": round(t / c, 2), "total_us": round(t, 1)}
                        for k, (c, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])]}


def timed(model, args, cuda: bool) -> dict:
    """``measure``, with ``--profile`` also the kernels of the whole measurement (graph steps,
    plain graph, eager steps) under "kernels" and one headline step's timeline (``step_timeline``)."""
    if not args.profile:
        return measure(model, args, cuda)
    row, kernels = kernel_table(lambda: measure(model, args, cuda), cuda)
    row = {**row, "kernels": kernels}
    if cuda:
        row["step"] = step_timeline(model, args)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--budgets", nargs="*", default=["4", "3.25", "2.25"], choices=list(MIXES))
    p.add_argument("--grids", nargs="*", default=[], choices=list(LAYOUTS),
                   help="also whole models in these layouts of random_llama.LAYOUTS, e.g. affine-g128-3 cols-3.25")
    p.add_argument("--max-len", type=int, default=256, help="static KV cache length")
    p.add_argument("--steps", type=int, default=200, help="tokens per timed run (CUDA graph)")
    p.add_argument("--eager-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--attention", choices=["triton", "sdpa"], default=None,
                   help="one-query attention for every variant: decode_attention.py's kernel (default on CUDA: "
                   "writes the cache, reads the filled positions) or torch SDPA over the masked static cache")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--profile", action="store_true", help="also record each variant's kernels (torch.profiler: "
                   "calls and time per call, kernels inside the CUDA graphs included) in decode.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.device, args.steps, args.eager_steps, args.max_len = "tiny", "cpu", 4, 4, 16
    cuda = args.device.startswith("cuda")
    args.attention = args.attention or ("triton" if cuda else "sdpa")
    dtype = torch.float16 if cuda else torch.float32
    model = random_llama(args.shape, args.layers, dtype=dtype, device=args.device)
    meta = {"date": datetime.date.today().isoformat(), "shape": args.shape, "attention": args.attention,
            "layers": model.config.num_hidden_layers, "max_len": args.max_len, "steps": args.steps,
            "device_name": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "command": "python benchmarks/decode.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    dense = "fp16" if cuda else "fp32"
    rows = [{"variant": dense, "bits": 16.0 if cuda else 32.0,
             "block_linear_gib": round(linear_bytes(model) / 2**30, 3), **timed(model, args, cuda)}]
    print(json.dumps(rows[-1]), flush=True)
    originals = [(block, name, m) for block, name, m in block_linears(model)]
    variants = [(f"anybit {budget}", lambda budget=budget: to_anybit(model, MIXES[budget])) for budget in args.budgets]
    variants += [(f"anybit {layout}", lambda layout=layout: to_layout(model, layout)) for layout in args.grids]
    if args.grids:
        os.environ["ANYBIT_GRID_KERNELS"] = "1"  # their kernels, on request for now (kernels.grid_kernels_on)
    for variant, make in variants:
        make()
        row = {"variant": variant, "bits": round(honest_bits(model), 4),
               "block_linear_gib": round(linear_bytes(model) / 2**30, 3), **timed(model, args, cuda)}
        row["resident_gib"] = round(resident_bytes(model) / 2**30, 3)
        if cuda:  # the kernels against the pure-torch path; the fused glue against the plain step
            plain = first_step_logits(model, args)
            row["logits_rel_err_vs_reference"] = rel_err(plain, first_step_logits(model, args, reference=True))
            row["logits_rel_err_fused_vs_plain"] = rel_err(first_step_logits(model, args, fuse=True), plain)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if cuda and variants:
        # the dense model again, after the quantized ones: the same GPU state on both sides of them (a run's
        # first variant was up to 2.5% off its second run, H100), and every ratio against the faster of the two
        for block, name, m in originals:
            block.set_submodule(name, m)
        rows.append({**rows[0], **timed(model, args, cuda), "variant": f"{dense} (again)"})
        print(json.dumps(rows[-1]), flush=True)
    dense_best = max(r["tokens_per_s"] for r in rows if r["variant"].startswith(dense))
    for r in rows:
        if not r["variant"].startswith(dense):
            r["speedup_vs_fp16"] = round(r["tokens_per_s"] / dense_best, 2)
    lines = [f"Decode, batch 1, {meta['shape']} ({meta['layers']} blocks), static cache {args.max_len}, "
             f"attention {args.attention}, {meta['device_name']}, {meta['date']}", "",
             "| variant | honest bits | block linears (stored / held) | tokens/s | x fp16 (faster run) | tokens/s, graph without "
             "fusion | tokens/s, eager |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        held = f" / {r['resident_gib']}" if "resident_gib" in r else ""
        lines.append(f"| {r['variant']} | {r['bits']} | {r['block_linear_gib']}{held} GiB | {r['tokens_per_s']} | "
                     f"{r.get('speedup_vs_fp16', '-')} | {r.get('tokens_per_s_graph_unfused', '-')} | "
                     f"{r['tokens_per_s_eager']} |")
    write_report(args.out, "decode", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")
    return 0


def write_report(out: str, stem: str, payload: dict, text: str) -> None:
    """``stem``.json (payload) and ``stem``.md (text) into ``out``, each written atomically; text printed."""
    os.makedirs(out, exist_ok=True)
    write_file_atomic(Path(out) / f"{stem}.json", lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    write_file_atomic(Path(out) / f"{stem}.md", lambda tmp: tmp.write_text(text))
    print(text)


if __name__ == "__main__":
    sys.exit(main())
