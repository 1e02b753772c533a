"""Sequential layer-wise calibration (GPTQ style): the driver that walks a model.

Capture the first decoder block's inputs, then for each block: collect statistics of each
linear's inputs, let the method quantize the linears, and re-run the block so the next block
sees the quantized block's outputs. Only one block sits on the compute device at a time.
The model runs with its KV cache off: replaying captured inputs through a block that holds a
cache would let attention see earlier samples. With a ``store`` (``anybit.resume``) each
finished block is saved, and a block an interrupted run finished is restored instead of redone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from anybit.errors import AnybitError
from anybit.models import block_linears, decoder_blocks
from anybit.quant.qweight import QuantizedWeight
from anybit.timing import recording, stage


@dataclass
class LinearStats:
    """What one calibration pass saw at a linear's input."""

    hessian: torch.Tensor  # (in, in): mean of x x^T over calibration tokens
    n_tokens: int
    inputs: torch.Tensor | None = None  # a subsample of input rows, for methods that score outputs

    @property
    def act_sq(self) -> torch.Tensor:
        """Mean squared activation per input channel, diag(H)."""
        return torch.diag(self.hessian)


def add_gram(h: torch.Tensor, x: torch.Tensor) -> None:
    """h += x^T x in fp32. fp16/bf16 inputs on CUDA multiply on tensor cores with fp32
    accumulation and output: every product of two half-precision numbers is exact in fp32, so
    this is the fp32 product of the upcast inputs (summation order aside), an order of magnitude
    faster than an fp32 matrix product (BENCHMARKS.md, quantization speed: the statistics stage)."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        h.add_(torch.mm(x.t(), x, out_dtype=torch.float32))
    else:
        x = x.float()
        h.addmm_(x.t(), x)


class _StatsHook:
    def __init__(self, in_features: int, device, keep_inputs: int):
        self.h = torch.zeros(in_features, in_features, device=device)
        self.n = 0
        self.keep_inputs = keep_inputs
        self.kept: list[torch.Tensor] = []

    def __call__(self, module, args, output):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        add_gram(self.h, x)
        self.n += x.shape[0]
        if self.keep_inputs:
            self.kept.append(x[::8].float().cpu())  # every 8th token: enough for a few thousand kept

    def stats(self) -> LinearStats:
        inputs = None
        if self.keep_inputs:
            inputs = torch.cat(self.kept)
            step = max(1, inputs.shape[0] // self.keep_inputs)
            inputs = inputs[::step][: self.keep_inputs]
        return LinearStats(self.h / max(self.n, 1), self.n, inputs)


class _Captured(Exception):
    pass


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device) -> None:
    """Move every parameter and buffer that does not belong to a decoder block."""
    inside = {id(m) for blk in blocks for m in blk.modules()}
    for module in model.modules():
        if id(module) not in inside and module is not blocks:
            module._apply(lambda t: t.to(device), recurse=False)


# What a decoder block's forward calls its KV cache, across transformers versions (5.17: past_key_values,
# 5.25: cache): never replayed, so that no block sees the samples before.
CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "cache")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, samples: torch.Tensor, batch_size: int, device):
    """Run the model up to its first decoder block; return per-batch hidden states and kwargs."""
    blocks = decoder_blocks(model)
    _move_outside_blocks(model, blocks, device)
    hiddens, kwargs_list = [], []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        hiddens.append(hidden)
        kw = {k: v for k, v in kwargs.items() if k not in CACHE_ARGUMENTS + ("hidden_states",)}
        kw["use_cache"] = False
        kwargs_list.append(kw)
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, samples.shape[0], batch_size):
            try:
                model(samples[start : start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return hiddens, kwargs_list


@torch.no_grad()
def run_block(block: nn.Module, hiddens, kwargs_list):
    outs = []
    for hidden, kw in zip(hiddens, kwargs_list):
        out = block(hidden, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.no_grad()
def sequential_groups(block: nn.Module, hidden, kwargs) -> list[list[str]]:
    """Linears in call order, grouped when they read the same input tensor (q/k/v, gate/up)."""
    linears = block_linears(block)
    calls: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps their identities unique
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: calls.append((name, args[0])))
        for name, m in linears.items()
    ]
    try:
        block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    for name, x in calls:
        if name in {n for g in groups for n in g}:
            continue
        if groups and x is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = x
    return groups


@dataclass
class QuantizationResult:
    layers: dict[str, QuantizedWeight] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def total_bits(self) -> int:
        return sum(q.total_bits() for q in self.layers.values())

    def numel(self) -> int:
        return sum(q.numel for q in self.layers.values())

    def bits_per_weight(self) -> float:
        return self.total_bits() / max(self.numel(), 1)

    def index_bits_per_weight(self) -> float:
        return sum(q.code_bits() for q in self.layers.values()) / max(self.numel(), 1)


@torch.no_grad()
def collect_stats(block, groups: list[list[str]], hiddens, kwargs_list, keep_inputs: int = 0) -> dict[str, LinearStats]:
    """Statistics for the linears of ``groups``; linears of one group share one input, so one
    Hessian each. Each forward stops once the last group's input has been seen."""
    linears = block_linears(block)
    hooks = [_StatsHook(linears[g[0]].in_features, linears[g[0]].weight.device, keep_inputs) for g in groups]

    def stop_after(hook):
        def run(module, args, output):
            hook(module, args, output)
            raise _Captured
        return run

    handles = [linears[g[0]].register_forward_hook(h) for g, h in zip(groups[:-1], hooks[:-1])]
    handles.append(linears[groups[-1][0]].register_forward_hook(stop_after(hooks[-1])))
    try:
        for hidden, kw in zip(hiddens, kwargs_list):
            try:
                block(hidden, **kw)
            except _Captured:
                pass
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for names, hook in zip(groups, hooks):
        shared = hook.stats()
        stats.update({n: shared for n in names})
    return stats


def _use_quantized(linear: nn.Linear, qweight: QuantizedWeight) -> None:
    linear.weight.data = qweight.dequantize(linear.weight.dtype).to(linear.weight.device)


def _check_finite(stats: dict[str, LinearStats], where: str) -> None:
    """NaN/Inf activations would quantize into a garbage checkpoint without any error."""
    for name, s in stats.items():
        if not bool(torch.isfinite(s.hessian).all()):
            raise AnybitError(f"calibration statistics of {where}.{name} contain NaN or Inf: the model's "
                              "activations overflow there (damaged weights, or a model that needs other inputs)")


@torch.no_grad()
def walk_blocks(model: nn.Module, samples: torch.Tensor, visit, device="cpu", batch_size: int = 8,
                true_sequential: bool = True, replace: bool = True, keep_inputs: int = 0,
                needs_stats: bool = True, desc: str = "quantize", progress: bool = True,
                store=None, on_restored=None) -> None:
    """Walk the decoder blocks with calibration data, calling ``visit(name, weight, stats)`` per linear.

    With ``replace`` the visit returns a QuantizedWeight whose de-quantized values replace the
    weight, so later linears and blocks calibrate on the quantized model's activations (one
    statistics pass per group of linears sharing an input when ``true_sequential``). Without it
    the model is left as it is: a planning pass over full-precision activations.
    With a ``store`` (replace only) each block's QuantizedWeights go to ``store.save_block``, and
    a block ``store.load_block`` returns is not calibrated again: its weights are put back (and
    handed to ``on_restored``) and the block only re-run to give the next block its inputs.
    """
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    with stage("calibration_forward"):
        hiddens, kwargs_list = capture_block_inputs(model, samples, batch_size, device)
    for b in tqdm(range(len(blocks)), desc=desc, disable=not progress):
        block = blocks[b].to(device)
        linears = block_linears(block)
        layers = {f"{prefix}.{b}.{name}": linear for name, linear in linears.items()}
        shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
        done = store.load_block(b, shapes) if store is not None else None
        if done is not None:
            for layer, linear in layers.items():
                _use_quantized(linear, done[layer])
            on_restored(done)
        else:
            done = {}
            groups = sequential_groups(block, hiddens[0], kwargs_list[0])
            sequential = true_sequential and replace
            for pass_groups in ([g] for g in groups) if sequential else [groups]:
                with stage("statistics"):
                    stats = collect_stats(block, pass_groups, hiddens, kwargs_list, keep_inputs) if needs_stats else {}
                _check_finite(stats, f"{prefix}.{b}")
                for name in (n for g in pass_groups for n in g):
                    layer = f"{prefix}.{b}.{name}"
                    try:
                        with stage("quantize" if replace else "plan"):
                            qweight = visit(layer, linears[name].weight.data, stats.get(name))
                    except AnybitError as exc:  # e.g. an unreachable budget: say where
                        raise AnybitError(f"{layer}: {exc}") from exc
                    if replace:
                        _use_quantized(linears[name], qweight)
                        done[layer] = qweight
            if store is not None:
                store.save_block(b, done)
        with stage("calibration_forward"):
            hiddens = run_block(block, hiddens, kwargs_list)
        blocks[b] = block.to("cpu") if device != "cpu" else block


@torch.no_grad()
def quantize_model(model: nn.Module, samples: torch.Tensor, method, device="cpu", batch_size: int = 8,
                   true_sequential: bool = True, progress: bool = True, store=None,
                   place_model: bool = True) -> QuantizationResult:
    """Quantize every linear inside the decoder blocks of ``model`` in place with ``method``.

    ``method.quantize(weight, stats, name) -> QuantizedWeight``. A method that shares one budget
    across layers also has ``plan(weight, stats, name)`` and ``finish_plan()``: it then sees every
    layer once in a planning pass before the quantizing pass. ``store`` (``resume.RunProgress``)
    saves the plan and each finished block, and restores those of an interrupted run. The model
    ends on ``device`` (for evaluation) with ``place_model``, else its blocks stay on the CPU.
    ``result.timings`` has the wall time of each stage (``anybit.timing``).
    """
    result = QuantizationResult()
    with recording(result.timings):
        common = dict(device=device, batch_size=batch_size, keep_inputs=getattr(method, "keep_inputs", 0),
                      needs_stats=getattr(method, "needs_stats", True), progress=progress)
        name = getattr(method, "name", "method")
        if getattr(method, "needs_plan", False) and not (store is not None and store.restore_plan(method)):
            walk_blocks(model, samples, lambda n, w, s: method.plan(w, s, n), replace=False,
                        desc=f"plan ({name})", **common)
            with stage("allocate"):
                method.finish_plan()
            if store is not None:
                store.save_plan(method)

        def visit(layer: str, weight, stats):
            qweight = method.quantize(weight, stats, layer).to(weight.device)
            result.layers[layer] = qweight.to("cpu")  # results wait on the host; the device holds one block
            return qweight

        walk_blocks(model, samples, visit, true_sequential=true_sequential,
                    desc=f"quantize ({name})", store=store, on_restored=result.layers.update, **common)
    if device != "cpu" and place_model:
        model.to(device)
    return result
