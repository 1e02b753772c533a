"""Library entry points behind the CLI: quantize a model, evaluate a model or checkpoint."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from anybit import __version__, resume
from anybit.data import Corpus
from anybit.errors import AnybitError
from anybit.evaluate import perplexity
from anybit.fileio import atomic_directory, check_output_dir, write_json_atomic
from anybit.formats.checkpoint import FORMAT_VERSION, drop_source_quantizer, save_packed
from anybit.methods import build_method
from anybit.models import load_model
from anybit.pipeline import QuantizationResult, quantize_model

REPORT_FILE = "anybit.json"
OUT_FORMATS = {  # --format name -> the report's description of what was written
    "packed": {"name": "anybit-packed", "version": FORMAT_VERSION},
    "dequantized": {"name": "anybit-dequantized", "version": 1, "weights_dtype": "float16"},
}
RUN_ONLY = ("timings_s", "resumed_blocks")  # returned, not written: the written report is reproducible


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AnybitError(f"device {device} requested but CUDA is not available on this machine")
    if not (device == "cpu" or device.startswith("cuda")):
        raise AnybitError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    return device


def layer_report(result: QuantizationResult) -> dict:
    report = {}
    for name, q in result.layers.items():
        widths, counts = torch.unique(q.bits, return_counts=True)
        report[name] = {
            "shape": [q.out_features, q.in_features],
            "grid": q.kind,
            "bits_per_weight": round(q.bits_per_weight(), 6),
            "index_bits_per_weight": round(q.index_bits_per_weight(), 6),
            "widths": {str(int(w)): int(c) for w, c in zip(widths, counts)},
            "stored_bits": q.storage_bits(),
        }
    return report


def quantize(model: str, method: str, bits: float, out: str | Path | None = None, group_size: int = 0,
             corpus: str = "shakespeare", nsamples: int = 64, seqlen: int = 512, device: str | None = None,
             seed: int = 0, eval_corpus: str | None = "shakespeare-heldout", eval_windows: int = 64,
             overwrite: bool = False, progress: bool = True, out_format: str = "packed", **method_options) -> dict:
    """Quantize ``model`` with ``method`` at ``bits``; write ``out`` (if given) in ``out_format``
    (one of OUT_FORMATS); return the report."""
    if not math.isfinite(bits):
        raise AnybitError(f"bits must be a finite number, got {bits}")
    if nsamples < 1 or seqlen < 2:
        raise AnybitError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    if out_format not in OUT_FORMATS:
        raise AnybitError(f"unknown output format {out_format!r}: use {' or '.join(OUT_FORMATS)}")
    if out is not None:
        check_output_dir(Path(out), overwrite)
    quantizer = build_method(method, bits, group_size, **method_options)
    calib = Corpus(corpus)
    evaluation = Corpus(eval_corpus) if eval_corpus else None
    device = resolve_device(device)
    torch.manual_seed(seed)

    t0 = time.perf_counter()
    lm, tokenizer = load_model(model, progress=progress)
    load_s = time.perf_counter() - t0
    samples = calib.calibration(tokenizer, nsamples, seqlen, seed)
    settings = {"bits": bits, "group_size": group_size, **method_options}
    calibration = {"corpus": corpus, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    run = None if out is None else resume.fingerprint(model, method, settings, calibration, samples, device,
                                                      __version__)
    t0 = time.perf_counter()
    with resume.progress_for(out, run, overwrite) as store:  # resumes an interrupted run of this command
        result = quantize_model(lm, samples, quantizer, device=device, progress=progress, store=store)
    total_s = time.perf_counter() - t0
    report = {
        "anybit_version": __version__,
        "format": OUT_FORMATS[out_format],
        "model": model,
        "method": method,
        "settings": settings,
        "calibration": calibration,
        "bits_per_weight": round(result.bits_per_weight(), 6),
        "index_bits_per_weight": round(result.index_bits_per_weight(), 6),
        "quantized_params": result.numel(),
        "total_bits": result.total_bits(),
        "timings_s": {"load": round(load_s, 3), "total": round(total_s, 3),
                      **{k: round(v, 3) for k, v in result.timings.items()}},
        "device": device,
        "layers": layer_report(result),
        "evaluation": {},
        "resumed_blocks": store.resumed if store is not None else 0,
    }
    if evaluation is not None:
        ids = evaluation.evaluation(tokenizer, seqlen)
        ppl = perplexity(lm, ids, seqlen, eval_windows, device=device, progress=progress)
        report["evaluation"][eval_corpus] = ppl.as_dict()
    if out is not None:
        save(lm, tokenizer, result, report, Path(out), overwrite, out_format)
        resume.discard_progress(out)
    return report


def save(lm, tokenizer, result: QuantizationResult, report: dict, out: Path, overwrite: bool,
         out_format: str = "packed") -> None:
    """Write the checkpoint atomically: packed (``lm``'s quantized linears become ``AnybitLinear``)
    or de-quantized fp16 weights; the report beside it either way."""
    drop_source_quantizer(lm)
    with atomic_directory(out, overwrite) as tmp:
        if out_format == "packed":
            save_packed(lm, tokenizer, result.layers, tmp, method=report["method"], settings=report["settings"])
        else:
            lm.to(torch.float16).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / REPORT_FILE, {k: v for k, v in report.items() if k not in RUN_ONLY})


def read_report(path: str | Path) -> dict | None:
    report = Path(path) / REPORT_FILE
    if not report.is_file():
        return None
    try:
        return json.loads(report.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AnybitError(f"{report} is unreadable: {exc}") from exc


def evaluate(model: str, corpus: str = "shakespeare-heldout", seqlen: int = 512, windows: int = 64,
             device: str | None = None, progress: bool = True) -> dict:
    """Perplexity of a model, checkpoint directory or built-in name on ``corpus``."""
    evaluation = Corpus(corpus)
    device = resolve_device(device)
    lm, tokenizer = load_model(model, progress=progress)
    lm.to(device=device, dtype=torch.float32)
    ppl = perplexity(lm, evaluation.evaluation(tokenizer, seqlen), seqlen, windows, device=device, progress=progress)
    result = {"model": model, "corpus": corpus, **ppl.as_dict()}
    report = read_report(model) if Path(model).is_dir() else None
    if report is not None:
        result["bits_per_weight"] = report.get("bits_per_weight")
        result["method"] = report.get("method")
    return result


def evaluate_tasks(model: str, tasks: list[str], device: str | None = None, limit: int | None = None,
                   batch_size: int = 8) -> dict:
    """lm-evaluation-harness tasks (e.g. piqa, arc_easy) on a model or checkpoint, through lm_eval's
    HFLM wrapped around the model anybit loaded (so packed checkpoints run packed)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise AnybitError("--tasks needs lm-evaluation-harness, which is not installed: "
                          "pip install 'anybit[eval]' (or pip install lm_eval)") from None
    device = resolve_device(device)
    lm, tokenizer = load_model(model, device=device)
    harness_model = HFLM(pretrained=lm, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = lm_eval.simple_evaluate(model=harness_model, tasks=[t.strip() for t in tasks if t.strip()], limit=limit)
    return {"model": model, "tasks": results["results"]}


def sweep(model: str, methods: list[str], budgets: list[float], out: str | Path, corpus: str = "shakespeare",
          eval_corpus: str = "shakespeare-heldout", nsamples: int = 64, seqlen: int = 512, eval_windows: int = 64,
          seed: int = 0, device: str | None = None, overwrite: bool = False, progress: bool = True) -> str:
    """Run ``methods`` x ``budgets`` (plus fp); write sweep.md, sweep.json and pareto.png to ``out``."""
    from anybit.report import markdown_table, pareto_plot
    from anybit.sweep import Config, config_for, run_sweep

    Corpus(corpus), Corpus(eval_corpus)  # unknown corpora fail before any work
    check_output_dir(Path(out), overwrite)
    configs = [Config("fp")] + [config_for(m, b) for m in methods for b in budgets]
    rows = run_sweep(model, configs, corpus, eval_corpus, nsamples, seqlen, eval_windows, seed,
                     resolve_device(device), progress)
    table = markdown_table(rows)
    fp_ppl = rows[0].ppl
    with atomic_directory(Path(out), overwrite) as tmp:
        (tmp / "sweep.md").write_text(table)
        (tmp / "sweep.json").write_text(json.dumps([r.as_dict() for r in rows], indent=2))
        pareto_plot(rows, tmp / "pareto.png", fp_ppl, f"{model}: perplexity vs honest bits")
    return table
