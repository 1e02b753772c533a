"""Run many (method, budget) configurations on one model with one calibration/evaluation set.

The model is loaded and the corpora tokenized once; each configuration quantizes a fresh copy.
Used by ``anybit sweep`` and ``benchmarks/ladder.py``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from anybit.data import Corpus
from anybit.errors import AnybitError
from anybit.evaluate import perplexity
from anybit.methods import build_method
from anybit.models import load_model
from anybit.pipeline import quantize_model


@dataclass(frozen=True)
class Config:
    method: str  # "fp" for the unquantized model
    bits: float = 16
    group_size: int = 0
    options: tuple = ()  # sorted (key, value) pairs

    @classmethod
    def parse(cls, text: str) -> "Config":
        """``method[:bits[:group[:key=value,...]]]``, e.g. ``gptq:3:128`` or ``skim:3.25:0:scope=model``."""
        parts = text.split(":")
        method = parts[0]
        bits = float(parts[1]) if len(parts) > 1 else 16.0
        group = int(parts[2]) if len(parts) > 2 else 0
        options = []
        if len(parts) > 3 and parts[3]:
            for item in parts[3].split(","):
                key, _, value = item.partition("=")
                options.append((key, coerce_value(value)))
        return cls(method, bits, group, tuple(sorted(options)))

    @property
    def label(self) -> str:
        if self.method == "fp":
            return "fp"
        bits = f"{self.bits:g}-bit"
        group = f" g{self.group_size}" if self.group_size else ""
        opts = "".join(f" {k}={v}" for k, v in self.options)
        return f"{self.method} {bits}{group}{opts}"


UNIFORM_METHODS = ("rtn", "gptq", "squeezellm")


def config_for(method: str, budget: float) -> Config:
    """The configuration of ``method`` for an honest budget. Uniform-width methods take whole
    bits: rtn/gptq spend the fraction on fp16 scale+zero groups (3.25 -> 3-bit g128, 2.5 ->
    2-bit g64, 4 -> 4-bit per channel); squeezellm takes the whole bits below the budget."""
    if method not in UNIFORM_METHODS:
        return Config(method, float(budget))
    bits = math.floor(budget)
    frac = budget - bits
    if method == "squeezellm" or frac < 1e-9:
        return Config(method, float(bits))
    return Config(method, float(bits), int(round(32 / frac)))


def coerce_value(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


@dataclass
class Row:
    config: Config
    bits_per_weight: float
    index_bits_per_weight: float
    ppl: float
    tokens_scored: int
    quantize_s: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["config"] = {"method": self.config.method, "bits": self.config.bits,
                       "group_size": self.config.group_size, "options": dict(self.config.options),
                       "label": self.config.label}
        return d


def layer_meta_summary(result) -> dict:
    """What the methods noted per layer, summed up: allocation gaps, kept/rejected steps."""
    metas = [q.meta for q in result.layers.values()]
    summary = {}
    gaps = [m["alloc_gap"] for m in metas if "alloc_gap" in m]
    if gaps:
        summary["max_alloc_gap"] = max(gaps)
    for key in ("scaling", "feedback"):
        kept = [m[key] for m in metas if key in m]
        if kept:
            summary[f"{key}_kept"] = f"{kept.count('kept')}/{len(kept)}"
    return summary


def run_sweep(model_spec: str, configs: list[Config], corpus="shakespeare", eval_corpus="shakespeare-heldout",
              nsamples=64, seqlen=512, eval_windows=64, seed=0, device="cpu", progress=True, on_row=None,
              recorded_errors: tuple = (AnybitError,)):
    """Rows in ``configs`` order. Exceptions of ``recorded_errors`` become a row with the error
    in ``extra`` so one failing configuration does not cost the rest of a long sweep."""
    base, tokenizer = load_model(model_spec, progress=progress)
    samples = Corpus(corpus).calibration(tokenizer, nsamples, seqlen, seed)
    ids = Corpus(eval_corpus).evaluation(tokenizer, seqlen)
    # Build every method first so a typo fails before hours of work.
    methods = {c: None if c.method == "fp" else build_method(c.method, c.bits, c.group_size, **dict(c.options))
               for c in configs}
    rows = []
    for config in configs:
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        try:
            if methods[config] is None:
                bpw = ibpw = 16.0
                extra = {}
            else:
                result = quantize_model(model, samples, methods[config], device=device, progress=progress)
                bpw, ibpw = result.bits_per_weight(), result.index_bits_per_weight()
                extra = {"timings_s": {k: round(v, 2) for k, v in result.timings.items()},
                         **layer_meta_summary(result)}
            quantize_s = time.perf_counter() - t0
            model.to(device)
            ppl = perplexity(model, ids, seqlen, eval_windows, device=device, progress=progress)
            row = Row(config, bpw, ibpw, ppl.ppl, ppl.tokens_scored, quantize_s, extra)
        except recorded_errors as exc:
            row = Row(config, float("nan"), float("nan"), float("nan"), 0, time.perf_counter() - t0,
                      {"error": f"{type(exc).__name__}: {exc}"})
        rows.append(row)
        if on_row:
            on_row(row)
        del model
    return rows
