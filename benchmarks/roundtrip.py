"""Packed checkpoints on the ladder model: logits round trip and real size, per method.

    python benchmarks/roundtrip.py [--device cuda] [--jobs N] [configs ...]

For each configuration: quantize SmolLM2-135M in memory, take fp32 logits on 4 held-out
windows, write the packed checkpoint, load it back (transformers + anybit's quantizer), and
compare logits (max abs diff); then the bytes of the packed weight tensors on disk (safetensors
headers) and in memory (the loaded AnybitLinear buffers) against honest bits x params / 8.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

DEFAULT = ["rtn:4:128", "gptq:3:128", "gptq:4:128:act_order=true", "squeezellm:3", "skim:2.25", "skim:3.25",
           "skim:4", "slim:3.25", "cmpq:3.25", "claq:3.25"]


def check(text: str, device: str, nsamples: int) -> dict:
    from anybit import api
    from anybit.data import Corpus
    from anybit.formats.checkpoint import inspect, load, packed_bytes
    from anybit.methods import build_method
    from anybit.models import load_model
    from anybit.pipeline import quantize_model
    from anybit.sweep import Config

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 8))
    config = Config.parse(text)
    lm, tokenizer = load_model("smollm2-135m", progress=False)
    samples = Corpus("shakespeare").calibration(tokenizer, nsamples, 512, 0)
    method = build_method(config.method, config.bits, config.group_size, **dict(config.options))
    result = quantize_model(lm, samples, method, device=device, progress=False)
    ids = Corpus("shakespeare-heldout").evaluation(tokenizer, 512)[: 4 * 512].view(4, 512).to(device)
    lm.to(device)
    with torch.no_grad():
        before = lm(ids, use_cache=False).logits.float()
    report = {"method": config.method, "settings": {"bits": config.bits, "group_size": config.group_size,
                                                    **dict(config.options)}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ckpt"
        api.save(lm, tokenizer, result, report, out, overwrite=False)
        info = inspect(out)
        loaded, _ = load(out, device=device)
        with torch.no_grad():
            after = loaded(ids, use_cache=False).logits.float()
        in_memory = packed_bytes(loaded)
    honest = result.total_bits() / 8
    return {"config": config.label, "bits": result.bits_per_weight(), "max_abs_diff": float((after - before).abs().max()),
            "disk": info["packed_bytes"], "memory": in_memory, "honest": honest, "fp16": info["fp16_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=DEFAULT)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows (quality is not measured here)")
    args = parser.parse_args()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(check, args.configs, [args.device] * len(args.configs),
                             [args.nsamples] * len(args.configs)))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"Measured {datetime.date.today()} on {device}, torch {torch.__version__}, "
          f"ANYBIT_KERNELS={os.environ.get('ANYBIT_KERNELS', 'auto')}.")
    print("| config | honest bits/weight | max abs logit diff (fp32) | packed on disk | packed in memory "
          "| honest bits x params / 8 | disk vs honest | fp16 | smaller than fp16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
        print(f"| {r['config']} | {r['bits']:.3f} | {r['max_abs_diff']:.2e} | {mib(r['disk'])} | {mib(r['memory'])} "
              f"| {mib(r['honest'])} | {100 * (r['disk'] / r['honest'] - 1):+.2f}% | {mib(r['fp16'])} "
              f"| {r['fp16'] / r['disk']:.2f}x |")


if __name__ == "__main__":
    main()
