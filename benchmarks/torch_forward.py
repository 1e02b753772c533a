"""The pure-torch forward of ``AnybitLinear``: what runs on a CPU, and on a GPU for the layouts
without a Triton kernel (per-column codebooks, affine grids) or with ``ANYBIT_KERNELS=reference``.
Each call decodes the packed weight (unpack the bit-plane codes, look them up) for one dense
product and drops it, so a saved-and-loaded model computes exactly what the in-memory quantized
model did.

    python benchmarks/torch_forward.py --out $OUT         # this 2-core CPU: ~5 minutes
    python benchmarks/torch_forward.py --smoke            # a tiny model, seconds
    python benchmarks/torch_forward.py --checkpoint out/sm-skim325   # also a saved checkpoint

Layouts (random codes and codebooks; the values do not change the speed), as the methods write them:
``rows`` per-row codebooks, 75% 3-bit and 25% 4-bit rows (skim, squeezellm at 3.25 bits);
``cols`` per-column codebooks, 75% 3-bit and 25% 4-bit columns, 0.5% fp16 outliers (cmpq, claq);
``affine`` 3-bit groups of 128 columns (rtn, gptq, slim).

1. Per layer, each linear shape of the model: ms per batch-1 call of ``AnybitLinear`` against
   ``nn.Linear`` holding the same weights in fp32, and ms to unpack / pack the codes of its first width
   block.
2. Whole model: a Llama in SmolLM2-135M's shape (``random_llama``; fp32, as anybit loads that
   model) whose decoder-block linears are all ``AnybitLinear`` of one layout: greedy ``generate``
   tokens/s (16-token prompt, --new-tokens new) and ms of one 512-token forward (a perplexity
   window), against the same model with dense ``nn.Linear``. With ``--checkpoint``, the same for
   a saved anybit checkpoint as ``anybit.load`` gives it, against its linears de-quantized.
Writes ``torch_forward.json`` to --out.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

from decode import block_linears, to_layout  # noqa: E402
from random_llama import SHAPES, random_llama, random_weight  # noqa: E402

from anybit.fileio import write_json_atomic  # noqa: E402
from anybit.formats.bitpack import pack_bitplanes, unpack_bitplanes  # noqa: E402
from anybit.nn import AnybitLinear  # noqa: E402
from anybit.quant.qweight import QuantizedWeight  # noqa: E402

LAYOUTS = ("rows", "cols", "affine")
LAYOUT_OF = {"rows": "rows-3.25", "cols": "cols-3.25", "affine": "affine-g128-3"}  # in random_llama.LAYOUTS


def random_qweight(layout: str, out_f: int, in_f: int, gen: torch.Generator) -> QuantizedWeight:
    """A ``QuantizedWeight`` of ``layout`` with random codes, codebooks, scales and outliers."""
    return random_weight(LAYOUT_OF[layout], out_f, in_f, gen)


def best_ms(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls after one warm-up call, in ms."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


@torch.no_grad()
def layer_rows(shapes, repeats: int, gen: torch.Generator) -> list[dict]:
    rows = []
    for out_f, in_f in shapes:
        x = torch.randn(1, in_f, generator=gen)
        for layout in LAYOUTS:
            q = random_qweight(layout, out_f, in_f, gen)
            module = AnybitLinear.from_quantized(q)
            dense = nn.Linear(in_f, out_f, bias=False)
            dense.weight.data = q.dequantize(torch.float32)
            assert torch.equal(module(x), dense(x)), "the torch forward must compute the dense product exactly"
            bits = next(iter(module.spec.blocks))  # the first width block's codes: what unpack / pack time
            words = module.codes(bits)
            codes = unpack_bitplanes(words, bits, module.spec.unit_length)
            rows.append({
                "shape": f"{out_f}x{in_f}", "layout": layout,
                "anybit_ms": round(best_ms(lambda: module(x), repeats), 3),
                "dense_fp32_ms": round(best_ms(lambda: dense(x), repeats), 3),
                "unpack_ms": round(best_ms(lambda: unpack_bitplanes(words, bits, module.spec.unit_length), repeats), 3),
                "pack_ms": round(best_ms(lambda: pack_bitplanes(codes, bits), repeats), 3),
                "unpacked_block": f"{words.shape[0]} units x {module.spec.unit_length} at {bits} bits",
            })
            print(rows[-1], flush=True)
    return rows


def dequantized(model: nn.Module) -> None:
    """Every AnybitLinear of ``model`` replaced by an nn.Linear holding its de-quantized weight."""
    for name, m in list(model.named_modules()):
        if isinstance(m, AnybitLinear):
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            dense.weight.data = m.dequantize(torch.float32)
            if m.bias is not None:
                dense.bias.data = m.bias.float()
            model.set_submodule(name, dense)


@torch.no_grad()
def model_row(model: nn.Module, name: str, linears: str, new_tokens: int, repeats: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, 16), generator=gen)
    window = torch.randint(0, vocab, (1, 512), generator=gen)

    def generate():
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)

    generate_ms = best_ms(generate, repeats)
    forward_ms = best_ms(lambda: model(window, use_cache=False), repeats)
    return {"model": name, "linears": linears, "new_tokens": new_tokens,
            "tokens_per_s": round(new_tokens / generate_ms * 1e3, 2), "forward_512_ms": round(forward_ms, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the tiny model, one repeat")
    ap.add_argument("--shapes", default="", help="extra layer shapes, e.g. 4096x4096,11008x4096")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", help="a saved anybit checkpoint to time as well")
    ap.add_argument("--parts", default="layers,random,checkpoint",
                    help="which of layers, random (the random models), checkpoint to run")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    shape = "tiny" if args.smoke else "smollm2-135m"
    parts = set(args.parts.split(","))
    repeats = 1 if args.smoke else args.repeats
    new_tokens = 4 if args.smoke else args.new_tokens
    torch.manual_seed(args.seed)
    cfg = SHAPES[shape]
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = hidden // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = [(hidden, hidden), (kv, hidden), (inter, hidden), (hidden, inter)]
    shapes += [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    gen = torch.Generator().manual_seed(args.seed)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "command": "python benchmarks/torch_forward.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "layers": layer_rows(shapes, repeats, gen) if "layers" in parts else [],
        "models": [],
    }
    for layout in (None,) + LAYOUTS if "random" in parts else ():
        model = random_llama(shape, dtype=torch.float32, device="cpu", fill_device="cpu", seed=args.seed)
        if layout is not None:
            to_layout(model, LAYOUT_OF[layout], args.seed)
        result["models"].append(model_row(model, shape, layout or "dense fp32", new_tokens, repeats, args.seed))
        print(result["models"][-1], flush=True)
    if args.checkpoint and "checkpoint" in parts:
        import anybit

        model, _ = anybit.load(args.checkpoint)
        for linears in ("anybit", "de-quantized fp32"):
            if linears != "anybit":
                dequantized(model)
            result["models"].append(model_row(model.eval(), args.checkpoint, linears, new_tokens, repeats,
                                              args.seed))
            print(result["models"][-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(Path(args.out) / "torch_forward.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
