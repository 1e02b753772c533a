"""Command line: a thin layer over ``anybit.api``. User errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import json
import sys

from anybit.errors import AnybitError

DEMO_MODEL = "smollm2-135m"
DEMO_METHOD, DEMO_BITS = "skim", 3.25  # the default recipe at the default budget


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="smollm2-135m, a Hugging Face directory, or a .gguf file")
    p.add_argument("--method", required=True, help="skim (default recipe), slim, cmpq, claq, rtn, gptq, squeezellm")
    p.add_argument("--bits", type=float, required=True, help="bits per weight")
    p.add_argument("--group-size", type=int, default=0, help="columns per group, 0 = per channel")
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by descending diag(H)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable: skim scope=model|layer, allocator=greedy|lagrangian, "
                        "scaling=true, feedback=false; slim sqc=code|paper|off; cmpq outlier_fraction=0.005; "
                        "claq reserve_top=0.014, reserve_rest=0.004")
    p.add_argument("--corpus", default="shakespeare", help="calibration corpus (default shakespeare)")
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-corpus", default="shakespeare-heldout", help="'none' to skip evaluation")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--out", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--format", choices=("packed", "dequantized"), default="packed",
                   help="packed anybit checkpoint (default) or de-quantized fp16 weights")
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anybit", description="Quantize language models to any bit budget.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize_args(sub.add_parser("quantize", help="quantize a model"))
    ev = sub.add_parser("eval", help="perplexity of a model or anybit checkpoint")
    ev.add_argument("model", help="checkpoint directory, Hugging Face directory, .gguf file or built-in name")
    ev.add_argument("--corpus", default="shakespeare-heldout")
    ev.add_argument("--windows", type=int, default=64, help="evaluation windows (default 64)")
    ev.add_argument("--tasks", help="lm-evaluation-harness tasks instead of perplexity, e.g. piqa,arc_easy")
    ev.add_argument("--limit", type=int, help="with --tasks: examples per task")
    _add_common(ev)
    ins = sub.add_parser("inspect", help="per-layer widths, bits per weight and sizes of a packed checkpoint")
    ins.add_argument("checkpoint", help="packed anybit checkpoint directory")
    ins.add_argument("--json", action="store_true", help="print the details as JSON")
    sw = sub.add_parser("sweep", help="methods x budgets: markdown table, JSON and a Pareto plot")
    sw.add_argument("--model", required=True)
    sw.add_argument("--methods", default="rtn,gptq,squeezellm,skim,slim,cmpq,claq")
    sw.add_argument("--budgets", default="2.25,2.5,3,3.25,4", help="honest bits per weight, comma-separated")
    sw.add_argument("--corpus", default="shakespeare")
    sw.add_argument("--eval-corpus", default="shakespeare-heldout")
    sw.add_argument("--nsamples", type=int, default=64)
    sw.add_argument("--eval-windows", type=int, default=64)
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--out", required=True, help="directory for sweep.md, sweep.json and pareto.png")
    _add_common(sw)
    demo = sub.add_parser("demo", help=f"quantize {DEMO_MODEL} at the default budget; print quality and size")
    demo.add_argument("--out", default="out/demo")
    _add_common(demo)
    return parser


def _quantize(args) -> dict:
    from anybit import api

    options = {"act_order": True} if args.act_order else {}
    options.update(_method_options(args.opt))
    return api.quantize(
        args.model, args.method, args.bits, out=args.out, group_size=args.group_size, corpus=args.corpus,
        nsamples=args.nsamples, seqlen=args.seqlen, device=args.device, seed=args.seed,
        eval_corpus=None if args.eval_corpus == "none" else args.eval_corpus, eval_windows=args.eval_windows,
        overwrite=args.overwrite, progress=not args.quiet, out_format=args.format, **options,
    )


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _inspect(args) -> None:
    from anybit.formats.checkpoint import inspect

    info = inspect(args.checkpoint)
    if args.json:
        print(json.dumps(info))
        return
    print(f"{args.checkpoint}: anybit packed checkpoint, format {info['format_version']}, method {info['method']}")
    width = max(len(name) for name in info["layers"])
    print(f"{'layer':<{width}}  {'shape':>11}  {'grid':<6}  {'widths (bits:units)':<24}  {'bits/w':>7}  "
          f"{'packed':>11}  {'fp16':>11}")
    for name, layer in info["layers"].items():
        widths = " ".join(f"{b}:{n}" for b, n in layer["widths"].items()) + " " + layer["units"]
        shape = "x".join(map(str, layer["shape"]))
        print(f"{name:<{width}}  {shape:>11}  {layer['grid']:<6}  {widths:<24}  {layer['bits_per_weight']:>7.4f}  "
              f"{_size(layer['packed_bytes']):>11}  {_size(layer['fp16_bytes']):>11}")
    params, packed, fp16 = info["quantized_params"], info["packed_bytes"], info["fp16_bytes"]
    print(f"total: {params} quantized weights at {packed * 8 / params:.4f} bits/weight: packed {_size(packed)} "
          f"vs fp16 {_size(fp16)} ({fp16 / packed:.2f}x smaller); other tensors {_size(info['other_bytes'])}")


def _print_summary(report: dict, out: str | None) -> None:
    print(f"method {report['method']}  bits/weight {report['bits_per_weight']:.4f} "
          f"(index bits {report['index_bits_per_weight']:.4f})  quantized params {report['quantized_params']}")
    for corpus, ppl in report["evaluation"].items():
        print(f"perplexity on {corpus}: {ppl['ppl']:.3f} ({ppl['tokens_scored']} tokens scored)")
    if report.get("resumed_blocks"):
        print(f"resumed an interrupted run: {report['resumed_blocks']} finished blocks restored")
    if out:
        print(f"wrote {out}")


def _method_options(pairs: list[str]) -> dict:
    from anybit.sweep import coerce_value

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AnybitError(f"--opt takes KEY=VALUE, got {pair!r}")
        options[key.replace("-", "_")] = coerce_value(value)
    return options


def _csv(text: str, kind):
    try:
        return [kind(x) for x in text.split(",") if x]
    except ValueError as exc:
        raise AnybitError(f"cannot read list {text!r}: {exc}") from exc


def _demo(args) -> None:
    from anybit import api

    report = api.quantize(DEMO_MODEL, DEMO_METHOD, DEMO_BITS, out=args.out, device=args.device,
                          seqlen=args.seqlen, overwrite=True, progress=not args.quiet)
    fp = api.evaluate(DEMO_MODEL, seqlen=args.seqlen, device=args.device, progress=not args.quiet)
    params = report["quantized_params"]
    print(f"demo: {DEMO_MODEL}, {DEMO_METHOD} at {DEMO_BITS} honest bits per weight, calibrated on shakespeare, "
          "scored on shakespeare-heldout")
    print(f"  fp32 baseline perplexity      {fp['ppl']:.3f}")
    q = report["evaluation"]["shakespeare-heldout"]
    print(f"  quantized perplexity          {q['ppl']:.3f}")
    print(f"  bits per quantized weight     {report['bits_per_weight']:.3f}")
    print(f"  quantized linears, fp16 size  {params * 2 / 2**20:.1f} MiB")
    print(f"  quantized linears, anybit     {report['total_bits'] / 8 / 2**20:.1f} MiB")
    print(f"  checkpoint written to {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "quantize":
            _print_summary(_quantize(args), args.out)
        elif args.command == "eval":
            from anybit import api

            if args.tasks:
                result = api.evaluate_tasks(args.model, args.tasks.split(","), args.device, args.limit)
            else:
                result = api.evaluate(args.model, args.corpus, args.seqlen, args.windows, args.device, not args.quiet)
            print(json.dumps(result))
        elif args.command == "inspect":
            _inspect(args)
        elif args.command == "demo":
            _demo(args)
        elif args.command == "sweep":
            from anybit import api

            print(api.sweep(args.model, _csv(args.methods, str), _csv(args.budgets, float), args.out, args.corpus,
                            args.eval_corpus, args.nsamples, args.seqlen, args.eval_windows, args.seed, args.device,
                            progress=not args.quiet))
    except AnybitError as exc:
        print(f"anybit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("anybit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
