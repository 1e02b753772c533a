"""The ladder: shared/protocol.md's offline quality benchmark, written into BENCHMARKS.md.

    python benchmarks/ladder.py                       # the protocol's reference rows
    python benchmarks/ladder.py fp rtn:4:128 skim:3.25 --section ladder-mixed

Loads SmolLM2-135M once, calibrates on 64 x 512 Shakespeare tokens, scores 64 x 512 held-out
tokens, and compares each row with the independent reference numbers where one exists.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

from anybit.sweep import Config, run_sweep

ROOT = Path(__file__).resolve().parent.parent
# shared/protocol.md, measured by an independent implementation (CPU fp32, 2026-11-22).
REFERENCE = {
    "fp": 42.908,
    "rtn 4-bit": 72.558,
    "rtn 4-bit g128": 56.143,
    "rtn 3-bit g128": 178.759,
    "gptq 4-bit": 63.435,
    "gptq 4-bit g128": 54.182,
    "gptq 3-bit": 156.635,
    "gptq 3-bit g128": 152.392,
    "gptq 2-bit g128": 37456.335,
}
DEFAULT = ["fp", "rtn:4", "rtn:4:128", "rtn:3:128", "gptq:4", "gptq:4:128", "gptq:3", "gptq:3:128", "gptq:2:128"]


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA, fp32, TF32 off)"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def notes(extra: dict) -> str:
    parts = []
    if "max_alloc_gap" in extra:
        parts.append(f"alloc gap <= {100 * extra['max_alloc_gap']:.2f}%")
    parts += [f"{k.replace('_kept', '')} kept {v}" for k, v in extra.items() if k.endswith("_kept")]
    if "error" in extra:
        parts.append(f"failed: {extra['error'][:120]}")
    return ", ".join(parts)


def markdown(rows, command: str) -> str:
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {machine()}, torch {torch.__version__}.",
        f"Command: `{command}`",
        "",
        "| config | honest bits/weight | index bits/weight | held-out ppl | reference ppl | vs reference | quantize s | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = REFERENCE.get(r.config.label)
        vs = f"{100 * (r.ppl / ref - 1):+.2f}%" if ref else ""
        lines.append(f"| {r.config.label} | {r.bits_per_weight:.3f} | {r.index_bits_per_weight:.3f} | {r.ppl:.3f} "
                     f"| {ref if ref else ''} | {vs} | {r.quantize_s:.0f} | {notes(r.extra)} |")
    return "\n".join(lines) + "\n"


def write_section(name: str, body: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# anybit benchmarks\n"
    block = f"{start}\n{body}{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n## {name}\n\n{block}\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _worker(configs, device, threads):
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return run_sweep("smollm2-135m", configs, device=device, progress=False, recorded_errors=(Exception,),
                     on_row=lambda r: print(f"{r.config.label}: {r.bits_per_weight:.3f} bits, ppl {r.ppl:.3f}, "
                                            f"{r.quantize_s:.0f} s {r.extra}", flush=True))


def run_parallel(configs, device: str, jobs: int):
    """Configs spread over ``jobs`` processes (each loads the model): quantization is mostly
    small sequential kernels, so several processes keep one GPU busy."""
    if jobs <= 1:
        return _worker(configs, device, torch.get_num_threads())
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shares = [configs[i::jobs] for i in range(jobs)]
    threads = max(1, (os.cpu_count() or 2) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_worker, shares, [device] * jobs, [threads] * jobs))
    by_config = {r.config: r for part in parts for r in part}
    return [by_config[c] for c in configs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=DEFAULT, help="method[:bits[:group[:k=v,...]]]")
    parser.add_argument("--section", default="ladder", help="BENCHMARKS.md section to (re)write")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write all rows as JSON here")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (each loads the model)")
    args = parser.parse_args()
    configs = [Config.parse(c) for c in args.configs]
    command = "python benchmarks/ladder.py " + " ".join(sys.argv[1:])
    rows = run_parallel(configs, args.device, args.jobs)
    table = markdown(rows, command.strip())
    print(table)
    write_section(args.section, table)
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in rows], indent=2))


if __name__ == "__main__":
    main()
