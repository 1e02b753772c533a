"""Packed anybit checkpoints (docs/format.md): write, check, inspect and load them.

A checkpoint is a Hugging Face model directory: safetensors weights in which every quantized
linear is replaced by its packed tensors (``formats/packed.py``), and a config.json whose
``quantization_config`` (``quant_method: "anybit"``) records the format version and each
module's ``LinearSpec``. Every check here turns a wrong or damaged checkpoint into one
``AnybitError`` that names the file, field or tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from anybit.errors import AnybitError
from anybit.formats.packed import LinearSpec, affine_column_widths
from anybit.nn.linear import AnybitLinear
from anybit.quant.qweight import QuantizedWeight

QUANT_METHOD = "anybit"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
WHERE = f"{CONFIG_FILE} quantization_config"

SAFETENSORS_DTYPES = {torch.float16: "F16", torch.int32: "I32", torch.int16: "I16", torch.uint8: "U8"}
SAFETENSORS_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4,
                          "F32": 4, "I64": 8, "U64": 8, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


# -- writing ------------------------------------------------------------------------------------

def pack_model(model: nn.Module, layers: dict[str, QuantizedWeight]) -> dict[str, LinearSpec]:
    """Replace each quantized ``nn.Linear`` of ``model`` (by full name) with its ``AnybitLinear``."""
    specs = {}
    for name, q in layers.items():
        linear = model.get_submodule(name)
        module = AnybitLinear.from_quantized(q, linear.bias).to(linear.weight.device)
        model.set_submodule(name, module)
        specs[name] = module.spec
    return specs


def drop_source_quantizer(model: nn.Module) -> None:
    """A model loaded from GGUF keeps transformers' gguf quantizer, which refuses to save; its
    weights are de-quantized already, so saving them is right once the quantizer is gone."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)


def quantization_config(specs: dict[str, LinearSpec], unquantized_modules: list[str], **info) -> dict:
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "modules": {name: spec.to_json() for name, spec in specs.items()},
        "unquantized_modules": sorted(unquantized_modules),
        **info,
    }


def save_packed(model, tokenizer, layers: dict[str, QuantizedWeight], folder: Path, **info) -> None:
    """Pack ``model`` in place and save it with ``tokenizer`` into ``folder`` (an existing, empty
    directory: callers write through ``fileio.atomic_directory``). ``info`` goes into the config."""
    specs = pack_model(model, layers)
    unquantized = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    model.config.quantization_config = quantization_config(specs, unquantized, **info)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# -- checking -----------------------------------------------------------------------------------

def check_quantization_config(config: dict) -> dict[str, LinearSpec]:
    """The module specs of an anybit ``quantization_config``, or an error naming the bad field."""
    if not isinstance(config, dict):
        raise AnybitError(f"{WHERE} must be an object")
    if config.get("quant_method") != QUANT_METHOD:
        raise AnybitError(f"{WHERE}.quant_method is {config.get('quant_method')!r}, not {QUANT_METHOD!r}")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise AnybitError(f"{WHERE}.format_version is {version!r}: this anybit reads format version "
                          f"{FORMAT_VERSION} (upgrade anybit for newer checkpoints)")
    modules = config.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise AnybitError(f"{WHERE}.modules is missing or empty")
    if not isinstance(config.get("unquantized_modules", []), list):
        raise AnybitError(f"{WHERE}.unquantized_modules must be a list")
    return {name: LinearSpec.from_json(entry, f"{WHERE}.modules[{name!r}]") for name, entry in modules.items()}


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AnybitError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnybitError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AnybitError(f"{path} must hold a JSON object")
    return config


def read_quantization_config(folder: Path) -> dict:
    config = read_config(folder)
    if "quantization_config" not in config:
        raise AnybitError(f"{Path(folder) / CONFIG_FILE} has no quantization_config: not an anybit checkpoint")
    return config["quantization_config"]


def read_specs(folder: Path) -> dict[str, LinearSpec]:
    """Parse and check the quantization config of the checkpoint in ``folder``."""
    return check_quantization_config(read_quantization_config(folder))


def weight_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AnybitError(f"{index} is damaged: {exc}") from None
    if not (folder / WEIGHTS_FILE).is_file():
        raise AnybitError(f"{folder / WEIGHTS_FILE} is missing")
    return [folder / WEIGHTS_FILE]


def read_headers(files) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's (shape, safetensors dtype) across ``files``, reading headers only."""
    from safetensors import SafetensorError, safe_open

    headers = {}
    for path in files:
        try:
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    headers[name] = (tuple(piece.get_shape()), piece.get_dtype())
        except (OSError, SafetensorError) as exc:
            raise AnybitError(f"{path} is damaged or truncated: {exc}") from None
    return headers


def read_tensors(files, names) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    wanted, found = set(names), {}
    for path in files:
        with safe_open(str(path), "pt", device="cpu") as f:
            found.update({name: f.get_tensor(name) for name in wanted & set(f.keys())})
    return found


def check_tensor(name: str, headers: dict, shape: tuple[int, ...], dtype: torch.dtype | None) -> None:
    if name not in headers:
        raise AnybitError(f"checkpoint tensor {name} is missing")
    got_shape, got_dtype = headers[name]
    if got_shape != tuple(shape):
        raise AnybitError(f"checkpoint tensor {name} has shape {list(got_shape)}, expected {list(shape)}")
    if dtype is not None and got_dtype != SAFETENSORS_DTYPES[dtype]:
        raise AnybitError(f"checkpoint tensor {name} has dtype {got_dtype}, expected {SAFETENSORS_DTYPES[dtype]}")


VALUE_CHECKED = ("widths", "perm", "outlier_indptr", "outlier_indices")


def check_values(name: str, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> None:
    """The index tensors must agree with the spec: a mismatch would silently scramble the weight."""
    if "widths" in tensors:
        widths = tensors["widths"]
        if spec.grid == "affine":  # blocks count columns
            widths = affine_column_widths(widths, spec.group_columns, spec.in_features)
        counts = torch.bincount(widths.long(), minlength=256)
        if any(int(counts[b]) != shape[spec.grid == "affine"] for b, shape in spec.blocks.items()):
            raise AnybitError(f"checkpoint tensor {name}.widths does not match {WHERE}.modules[{name!r}].blocks")
    if "perm" in tensors and not torch.equal(tensors["perm"].long().sort().values,
                                                    torch.arange(spec.in_features, device="cpu")):
        raise AnybitError(f"checkpoint tensor {name}.perm is not a permutation of {spec.in_features} columns")
    if "outlier_indptr" in tensors:
        indptr, indices = tensors["outlier_indptr"].long(), tensors["outlier_indices"].long()
        if indptr[0] != 0 or indptr[-1] != spec.outliers or bool((torch.diff(indptr) < 0).any()) \
                or bool(((indices < 0) | (indices >= spec.in_features)).any()):
            raise AnybitError(f"checkpoint tensors {name}.outlier_indptr/indices are not a valid CSR index")


def check_packed_tensors(files, specs: dict[str, LinearSpec]) -> dict:
    """Every packed tensor present with its shape and dtype, index tensors consistent; the headers."""
    headers = read_headers(files)
    to_read = []
    for name, spec in specs.items():
        for suffix, (shape, dtype) in spec.tensor_specs().items():
            check_tensor(f"{name}.{suffix}", headers, shape, dtype)
            if suffix in VALUE_CHECKED:
                to_read.append(f"{name}.{suffix}")
    values = read_tensors(files, to_read)
    for name, spec in specs.items():
        check_values(name, spec, {s: values[f"{name}.{s}"] for s in VALUE_CHECKED if f"{name}.{s}" in values})
    return headers


def check_model_tensors(model: nn.Module, files, specs: dict[str, LinearSpec]) -> None:
    """Before weights load: the packed tensors of ``specs`` check out, and every other tensor
    ``model`` expects is in ``files`` with its shape (transformers would fill a missing one with
    random values and only log it)."""
    headers = check_packed_tensors(files, specs)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    for name, tensor in model.state_dict().items():
        if name not in tied:
            check_tensor(name, headers, tuple(tensor.shape), None)


# -- reading ------------------------------------------------------------------------------------

def _natural_key(name: str) -> list:
    """model.layers.2 before model.layers.10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def inspect(folder: Path) -> dict:
    """Per quantized module: widths, bits per weight and bytes of its packed tensors vs fp16."""
    folder = Path(folder)
    qconfig = read_quantization_config(folder)
    specs = check_quantization_config(qconfig)
    headers = check_packed_tensors(weight_files(folder), specs)
    nbytes = {name: math.prod(shape) * SAFETENSORS_ITEM_BYTES.get(dtype, 0) for name, (shape, dtype) in headers.items()}
    layers, packed_names = {}, set()
    for name, spec in sorted(specs.items(), key=lambda item: _natural_key(item[0])):
        names = [f"{name}.{suffix}" for suffix in spec.tensor_specs() if suffix != "bias"]
        packed_names.update(names)
        params = spec.out_features * spec.in_features
        size = sum(nbytes[n] for n in names)
        layers[name] = {
            "shape": [spec.out_features, spec.in_features],
            "grid": spec.grid,
            "widths": {bits: spec.block_units(bits) for bits in sorted(spec.blocks)},
            "units": "groups" if spec.grid == "affine" else ("rows" if spec.lut_axis == 0 else "columns"),
            "bits_per_weight": size * 8 / params,
            "packed_bytes": size,
            "fp16_bytes": params * 2,
        }
    return {
        "format_version": qconfig["format_version"],
        "method": qconfig.get("method"),
        "layers": layers,
        "quantized_params": sum(spec.out_features * spec.in_features for spec in specs.values()),
        "packed_bytes": sum(layer["packed_bytes"] for layer in layers.values()),
        "fp16_bytes": sum(layer["fp16_bytes"] for layer in layers.values()),
        "other_bytes": sum(size for name, size in nbytes.items() if name not in packed_names),
        "unquantized_modules": qconfig.get("unquantized_modules", []),
    }


def load(folder, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a packed checkpoint; its linears are ``AnybitLinear`` modules."""
    from anybit.models import load_model

    read_specs(folder)  # config and version errors, worded by anybit rather than transformers
    return load_model(str(folder), dtype=dtype, device=device)


def packed_bytes(model: nn.Module) -> int:
    """Bytes the packed weights of ``model`` take in memory (biases not counted)."""
    return sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, AnybitLinear)
               for t in m.packed().values())

