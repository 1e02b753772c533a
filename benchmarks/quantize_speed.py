"""Quantization speed: the full anybit pipeline on a LLaMA-2-7B-shaped model (random weights).

    python benchmarks/quantize_speed.py --device cuda --methods skim:3.25 gptq:3:128 squeezellm:3
    python benchmarks/quantize_speed.py --layers 2 --methods skim:3.25:0:scaling=true   # options as ladder.py
    python benchmarks/quantize_speed.py --smoke      # tiny model on the CPU: exercises this file

Per method: wall time of each pipeline stage (``anybit.timing``; nested stages such as
``quantize/kmeans`` are part of their parent), the packing of every layer into the checkpoint
layout (on the device), total wall time, and peak GPU memory (``torch.cuda.max_memory_allocated``
and ``max_memory_reserved``) during quantization and during packing. Calibration: ``--nsamples``
x ``--seqlen`` random token ids (the model is random too, so text would mean nothing). The model
stays on the CPU; the pipeline moves one block at a time to the device. Writes
``quantize_speed.json`` and ``.md`` to --out (default $OUT or the current directory) after each
method, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

from random_llama import llama_config, random_llama  # noqa: E402

from anybit.formats.packed import pack_weight  # noqa: E402
from anybit.methods import build_method  # noqa: E402
from anybit.pipeline import quantize_model  # noqa: E402
from anybit.sweep import Config  # noqa: E402


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def run_one(args, spec: str) -> dict:
    config = Config.parse(spec)  # name:bits[:group[:key=value,...]], as benchmarks/ladder.py
    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    t0 = time.perf_counter()
    model = random_llama(args.shape, args.layers, dtype=dtype, device="cpu", seed=args.seed)
    build_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    samples = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(args.seed))
    method = build_method(config.method, config.bits, config.group_size, **dict(config.options))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = quantize_model(model, samples, method, device=args.device, batch_size=args.batch_size,
                            progress=args.progress, place_model=False)
    if cuda:
        torch.cuda.synchronize()
    quant_s = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else (0, 0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    packed_bytes = 0
    for q in result.layers.values():
        _spec, tensors = pack_weight(q.to(args.device))
        packed_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
    if cuda:
        torch.cuda.synchronize()
    pack_s = time.perf_counter() - t0
    pack_peak = torch.cuda.max_memory_allocated() if cuda else 0
    top = {k: v for k, v in result.timings.items() if "/" not in k}
    row = {
        "method": spec, "honest_bits": round(result.bits_per_weight(), 4), "quantized_params": result.numel(),
        "packed_bytes": packed_bytes, "quantize_s": round(quant_s, 1), "packing_s": round(pack_s, 1),
        "total_s": round(quant_s + pack_s, 1), "model_build_s": round(build_s, 1),
        "stages_s": {k: round(v, 3) for k, v in sorted(result.timings.items())},
        "other_s": round(quant_s - sum(top.values()), 1),  # block moves, finding the linears' groups
        "peak_gpu_gib": gib(peak[0]), "peak_gpu_reserved_gib": gib(peak[1]), "packing_peak_gpu_gib": gib(pack_peak),
    }
    del model, result
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"Quantization speed, {meta['shape']} ({meta['layers']} blocks), {meta['nsamples']} x {meta['seqlen']} "
             f"calibration tokens, {meta['device_name']}, {meta['date']}", "",
             "| method | honest bits | total | quantize | packing | peak GPU (alloc / reserved) | stages (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        stages = ", ".join(f"{k} {v}" for k, v in r["stages_s"].items())
        lines.append(f"| {r['method']} | {r['honest_bits']} | {r['total_s']} s | {r['quantize_s']} s | "
                     f"{r['packing_s']} s | {r['peak_gpu_gib']} / {r['peak_gpu_reserved_gib']} GiB | "
                     f"{stages}; other {r['other_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["skim:3.25", "gptq:3:128", "squeezellm:3"])
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--layers", type=int, default=None, help="only the first N decoder blocks (profiling)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--smoke", action="store_true", help="tiny model, 4 x 32 tokens, CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.nsamples, args.seqlen, args.device = "tiny", 4, 32, "cpu"
    layers = args.layers or llama_config(args.shape).num_hidden_layers
    meta = {"date": datetime.date.today().isoformat(), "shape": args.shape, "layers": layers,
            "nsamples": args.nsamples, "seqlen": args.seqlen, "torch": torch.__version__,
            "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                            else platform.processor() or "cpu"),
            "command": "python benchmarks/quantize_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for spec in args.methods:
        row = run_one(args, spec)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "quantize_speed.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "quantize_speed.md"), "w") as f:
            f.write(markdown(meta, rows))
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
