"""Decoding through transformers' own ``generate``: tokens/s at batch 1, fp16 vs anybit, as users run it.

    python benchmarks/generate.py --device cuda        # LLaMA-2-7B shape: fp16, anybit 4 / 3.25 / 2.25 bits
    python benchmarks/generate.py --smoke              # tiny model on the CPU

``decode.py`` times anybit's own decoding harness (one CUDA graph a step, fused glue, stacked
linears). This script times what a user gets from the model as ``transformers`` runs it, the same
calls for every variant (a LLaMA-2-7B-shaped model with random weights; the anybit variants' block
linears replaced as in ``decode.py``), greedy, batch 1, three ways:

- ``compiled``: ``generate(..., cache_implementation="static")``, which on a GPU compiles the
  decoding step itself (``torch.compile``, mode "reduce-overhead": CUDA graphs); anybit's linears are
  one opaque op each there (``anybit.nn.compiled``). On the CPU (``--smoke``) ``transformers`` does not
  compile, so this is the static cache, eager;
- ``static eager``: the same with ``disable_compile=True`` (every launch from Python);
- ``default``: plain ``generate(...)`` (a dynamic cache, eager).

Decoding speed is taken from two lengths, so that the prompt's prefill, the cache's set-up and
``generate``'s fixed costs cancel: (long - short new tokens) / (time of long - time of short), each
time the best of ``--repeats`` calls after a warm-up of both lengths (which compiles). The static
cache has ``--max-len`` positions in every call. Each row also says for how many new tokens the
compiled run picked the eager (default) run's tokens: compiled code rounds the glue between linears
(norms, rotary, attention) otherwise than eager code, and greedy picks of a random model, whose
logits are close to one another, part soon after. Writes ``generate.json`` and ``generate.md`` to --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

from decode import honest_bits, to_anybit, write_report  # noqa: E402
from random_llama import MIXES, random_llama  # noqa: E402

import anybit  # noqa: E402,F401  (registers the op and transformers' anybit integration)

MODES = {"compiled": dict(cache_implementation="static"),
         "static eager": dict(cache_implementation="static", disable_compile=True),
         "default": dict()}


def generate(model, prompt, new_tokens: int, mode: str, max_len: int) -> torch.Tensor:
    kwargs = dict(MODES[mode])
    if "cache_implementation" in kwargs:
        kwargs["max_cache_len"] = max_len
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, **kwargs)


def timed_generate(model, prompt, new_tokens: int, mode: str, args) -> tuple[float, torch.Tensor]:
    best, tokens = float("inf"), None
    for _ in range(args.repeats):
        if args.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = generate(model, prompt, new_tokens, mode, args.max_len)
        if args.cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, tokens


def reset_compiled(model) -> None:
    """Forget the compiled step (another variant's modules are in the model now)."""
    torch._dynamo.reset()
    if hasattr(model, "_compiled_call"):
        del model._compiled_call


def measure(model, args) -> dict:
    row, tokens = {}, {}
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(args.device)
    for mode in args.modes:
        reset_compiled(model)
        t0 = time.perf_counter()
        for n in (args.long, args.short):  # warm-up: compiles (both lengths share one cache size)
            generate(model, prompt, n, mode, args.max_len)
        if args.cuda:
            torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        t_long, tokens[mode] = timed_generate(model, prompt, args.long, mode, args)
        t_short, _ = timed_generate(model, prompt, args.short, mode, args)
        row[mode] = {"tokens_per_s": round((args.long - args.short) / (t_long - t_short), 1),
                     "seconds_long": round(t_long, 4), "seconds_short": round(t_short, 4),
                     "warm_up_s": round(warm, 1)}
        print(mode, json.dumps(row[mode]), flush=True)
    reset_compiled(model)
    if "compiled" in tokens and "default" in tokens:
        same = (tokens["compiled"] == tokens["default"])[0, args.prompt:].long()
        row["compiled_tokens_as_eager"] = int(same.cumprod(0).sum())  # new tokens before the first difference
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--budgets", nargs="*", default=["4", "3.25", "2.25"], choices=list(MIXES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens")
    p.add_argument("--short", type=int, default=32, help="new tokens of the short call")
    p.add_argument("--long", type=int, default=160, help="new tokens of the long call")
    p.add_argument("--max-len", type=int, default=256, help="static cache positions")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, few tokens")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.device, args.short, args.long, args.max_len, args.repeats = "tiny", "cpu", 2, 6, 32, 1
    if args.long <= args.short or args.prompt + args.long > args.max_len:
        p.error("need --short < --long and --prompt + --long <= --max-len")
    args.cuda = args.device.startswith("cuda")
    dtype = torch.float16 if args.cuda else torch.float32
    model = random_llama(args.shape, args.layers, dtype=dtype, device=args.device)
    dense = "fp16" if args.cuda else "fp32"
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "shape": args.shape,
            "layers": model.config.num_hidden_layers, "device_name": torch.cuda.get_device_name() if args.cuda else "cpu",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "prompt": args.prompt, "short": args.short, "long": args.long, "max_len": args.max_len,
            "command": "python benchmarks/generate.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    rows = [{"variant": dense, "bits": 16.0 if args.cuda else 32.0, **measure(model, args)}]
    for budget in args.budgets:
        to_anybit(model, MIXES[budget])
        rows.append({"variant": f"anybit {budget}", "bits": round(honest_bits(model), 4), **measure(model, args)})
    for r in rows[1:]:
        for mode in args.modes:
            r[mode]["x_dense"] = round(r[mode]["tokens_per_s"] / rows[0][mode]["tokens_per_s"], 2)
    lines = [f"generate, batch 1, {meta['shape']} ({meta['layers']} blocks), prompt {args.prompt}, "
             f"{args.long} - {args.short} new tokens, {meta['device_name']}, transformers {meta['transformers']}, "
             f"{meta['date']}", "",
             "| variant | honest bits | " + " | ".join(f"{m}: tokens/s (x {dense})" for m in args.modes)
             + " | compiled = eager for |",
             "| --- | --- | " + " | ".join("---" for _ in args.modes) + " | --- |"]
    for r in rows:
        cells = [f"{r[m]['tokens_per_s']} ({r[m].get('x_dense', 1.0)})" for m in args.modes]
        lines.append(f"| {r['variant']} | {r['bits']} | " + " | ".join(cells)
                     + f" | {r.get('compiled_tokens_as_eager', '-')} of {args.long} tokens |")
    write_report(args.out, "generate", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
