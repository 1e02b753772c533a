"""GPTQ's column loop on a GPU: each block of columns in one launch (``anybit.kernels.gptq_columns``)
against the loop from Python, on LLaMA-2-7B linear shapes.

    python3 benchmarks/gptq_speed.py --device cuda     # H100: ~1 min
    python3 benchmarks/gptq_speed.py --smoke           # tiny, CPU under TRITON_INTERPRET=1: exercises this file

Per (shape, grid): wall time of one ``gptq_quantize`` call with the column loop and with the fused
blocks (best of --repeats, the device synchronised around each), the codes that differ between the
two, and each one's layer error tr((W - Q) H (W - Q)^T). Weights N(0, 0.02); the Hessian of
correlated random inputs (2 x in_features tokens, a few loud channels, as real activations).
Grids: "codebook" -- per-row sorted codebooks, 75% of the rows 8 points and 25% 16 (SKIM's
feedback at 3.25 bits); "affine" -- 3-bit min-max grids in groups of 128 columns (GPTQ's
baseline), act order. Writes gptq_speed.json and .md to --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

from decode import write_report  # noqa: E402

from anybit.quant.gptq import CodebookColumnQuantizer, act_order_permutation, gptq_quantize  # noqa: E402
from anybit.quant.uniform import AffineColumnQuantizer  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def problem(rows: int, cols: int, device: str, seed: int = 0):
    gen = torch.Generator(device).manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, device=device) * 0.02
    mix = torch.randn(cols, cols, generator=gen, device=device) / cols**0.5 + torch.eye(cols, device=device)
    x = torch.randn(2 * cols, cols, generator=gen, device=device) @ mix
    x[:, : max(1, cols // 64)] *= 8
    h = x.t() @ x / x.shape[0]
    return w, h


def quantizer_for(grid: str, w: torch.Tensor, h: torch.Tensor):
    rows, cols = w.shape
    if grid == "codebook":  # the same codebooks for every call
        gen = torch.Generator().manual_seed(1)
        points = torch.full((rows,), 8)
        points[torch.randperm(rows, generator=gen)[: rows // 4]] = 16
        points = points.to(w.device)
        lut = torch.sort(torch.randn(rows, 16, generator=gen).to(w.device) * w.std(1, keepdim=True) * 2, 1).values
        lut = lut.masked_fill(torch.arange(16, device=w.device)[None, :] >= points[:, None], torch.inf)
        return CodebookColumnQuantizer(lut, cols), None
    groups = -(-cols // 128)
    return AffineColumnQuantizer(rows, cols, torch.full((groups,), 3), 128, device=w.device), act_order_permutation(h)


def layer_error(w, q, h) -> float:
    # tr(dW H dW^T) in float64: the fp32 of ``lfull.row_output_error`` would blur the ~1e-6 differences compared here
    d = (w - q).double()
    return float(((d @ h.double()) * d).sum())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(rows: int, cols: int, grid: str, device: str, repeats: int) -> dict:
    w, h = problem(rows, cols, device)
    row = {"shape": f"{rows}x{cols}", "grid": grid}
    results = {}
    for fused in (False, True):
        best = None
        for _ in range(repeats):
            quantizer, perm = quantizer_for(grid, w, h)
            sync(device)
            t0 = time.perf_counter()
            q = gptq_quantize(w, h, quantizer, perm=perm, fused=fused)
            sync(device)
            elapsed = time.perf_counter() - t0
            best = elapsed if best is None else min(best, elapsed)
        results[fused] = (q, quantizer.codes)
        key = "fused" if fused else "loop"
        row[f"{key}_s"] = round(best, 4)
        row[f"{key}_layer_error"] = layer_error(w, q, h)
    row["speedup"] = round(row["loop_s"] / row["fused_s"], 1)
    row["codes_differ"] = int((results[False][1] != results[True][1]).sum())
    row["codes"] = results[False][1].numel()
    row["layer_error_rel_diff"] = abs(row["fused_layer_error"] - row["loop_layer_error"]) / row["loop_layer_error"]
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"GPTQ column loop vs one launch a block, {meta['device_name']}, {meta['date']}", "",
             "| shape (out x in) | grid | loop s | fused s | speed-up | codes differing | layer error: loop / fused |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['grid']} | {r['loop_s']} | {r['fused_s']} | {r['speedup']}x | "
                     f"{r['codes_differ']} of {r['codes']} | {r['loop_layer_error']:.6g} / {r['fused_layer_error']:.6g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--smoke", action="store_true", help="two tiny shapes on the CPU under Triton's interpreter")
    args = p.parse_args(argv)
    shapes = [(40, 96), (24, 160)] if args.smoke else SHAPES
    if args.smoke:
        args.device, args.repeats = "cpu", 1
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
            "command": "python3 benchmarks/gptq_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    rows = []
    for rows_, cols in shapes:
        for grid in ("codebook", "affine"):
            rows.append(measure(rows_, cols, grid, args.device, args.repeats))
            print(rows[-1], flush=True)
    write_report(args.out, "gptq_speed", {"meta": meta, "rows": rows}, markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
