"""Resumable quantization: each finished decoder block is saved beside the output as the run goes.

``OUT.partial/`` sits beside ``OUT``, never inside it: ``OUT`` appears only when the checkpoint
is complete (``fileio.atomic_directory``), and ``OUT.partial`` has no config.json, so nothing
loads it as a model by mistake. It holds

- ``progress.json``: the run's fingerprint -- everything that decides the quantized weights.
  A different command finds a different fingerprint and is refused; ``--overwrite`` starts over.
- ``plan.pt``: a planning method's state after ``finish_plan`` (SKIM ``scope="model"``: the
  per-layer width allocation), so a resume neither redoes nor changes the plan.
- ``block-NNNN.safetensors``: every ``QuantizedWeight`` of a finished block, field by field
  (exact, whatever the packed format would round), the torch RNG state after the block, and a
  checksum. Each file is renamed into place when complete: a kill leaves a block whole or absent.
- ``lock``: held (flock) by the run writing here, so two runs cannot interleave blocks.

On resume the finished blocks' weights are restored and the captured calibration inputs replayed
through them: the very forward pass the uninterrupted run made, on the same weights, so the next
block sees bit-identical inputs on CPU. (Saving hidden states instead would cost nsamples x
seqlen x hidden floats per block for no gain in exactness.) A damaged progress file is never
skipped silently: the run stops and names it; deleting it redoes that part.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from anybit.errors import AnybitError
from anybit.fileio import atomic_directory, remove_stale, write_errors, write_file_atomic, write_json_atomic
from anybit.models import resolve_model
from anybit.quant.qweight import Outliers, QuantizedWeight

PROGRESS_FORMAT = "anybit-progress"
PROGRESS_VERSION = 1
MANIFEST = "progress.json"
PLAN_FILE = "plan.pt"
LOCK_FILE = "lock"
RNG_TENSOR = "rng_state"
START_OVER = "pass --overwrite to start over"


def progress_dir(out) -> Path:
    out = Path(out)
    if out.name in ("", ".", ".."):
        out = Path(os.path.abspath(out))
    return out.parent / f"{out.name}.partial"


def block_file(b: int) -> str:
    return f"block-{b:04d}.safetensors"


# -- what makes two runs the same run ------------------------------------------------------------

def model_signature(spec: str) -> list:
    """Name, size and modification time of each model file. Hashing gigabytes of weights on every
    start would cost more than it protects against; touching a model file counts as a change."""
    folder, gguf = resolve_model(spec)
    paths = [Path(folder) / gguf] if gguf else sorted(p for p in Path(folder).iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def tokens_digest(samples: torch.Tensor) -> str:
    """One hash for the calibration windows: corpus text, tokenizer, nsamples, seqlen and seed at once."""
    ids = samples.detach().cpu().to(torch.int64).contiguous()
    return hashlib.sha256(repr(tuple(ids.shape)).encode() + ids.numpy().tobytes()).hexdigest()


def fingerprint(model: str, method: str, settings: dict, calibration: dict, samples: torch.Tensor,
                device: str, version: str) -> dict:
    """Everything that decides the quantized weights (not evaluation or output format)."""
    data = {"anybit": version, "torch": torch.__version__, "model": model, "model_files": model_signature(model),
            "method": method, "settings": settings, "calibration": calibration,
            "calibration_tokens": tokens_digest(samples), "device": torch.device(device).type}
    return json.loads(json.dumps(data))  # as it reads back from progress.json (tuples become lists)


OPAQUE = {"model_files": "model files (size or modification time)",
          "calibration_tokens": "calibration tokens (corpus contents or tokenizer)"}


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def first_difference(old: dict, new: dict) -> str | None:
    """The first field in which two fingerprints differ, in words; None when they agree."""
    for key in list(new) + [k for k in old if k not in new]:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key in OPAQUE:
            return f"different {OPAQUE[key]}"
        if isinstance(a, dict) and isinstance(b, dict):
            inner = next(k for k in list(b) + list(a) if a.get(k) != b.get(k))
            key, a, b = f"{key}.{inner}", a.get(inner), b.get(inner)
        return f"a different {key} ({_short(a)} then, {_short(b)} now)"
    return None


# -- one block's results, field by field -------------------------------------------------------

def _digest(tensors: dict[str, torch.Tensor], text: str) -> str:
    h = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def qweight_parts(name: str, q: QuantizedWeight) -> tuple[dict[str, torch.Tensor], dict]:
    """Every field of ``q``: tensors by ``name.field``; the rest as JSON (meta: its plain values)."""
    tensors, info = {}, {}
    for f in fields(q):
        value = getattr(q, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f"{name}.{f.name}"] = value
        elif isinstance(value, Outliers):
            tensors[f"{name}.{f.name}.positions"] = value.positions
            tensors[f"{name}.{f.name}.values"] = value.values
        elif f.name == "meta":
            info["meta"] = {k: v for k, v in value.items() if isinstance(v, (str, int, float, bool))}
        elif value is not None:
            info[f.name] = value
    return tensors, info


def qweight_from_parts(name: str, tensors: dict[str, torch.Tensor], info: dict) -> QuantizedWeight:
    kwargs = dict(info)
    for f in fields(QuantizedWeight):
        if f"{name}.{f.name}" in tensors:
            kwargs[f.name] = tensors[f"{name}.{f.name}"]
        elif f"{name}.{f.name}.positions" in tensors:
            kwargs[f.name] = Outliers(tensors[f"{name}.{f.name}.positions"], tensors[f"{name}.{f.name}.values"])
    return QuantizedWeight(**kwargs)


def write_block(path: Path, layers: dict[str, QuantizedWeight], rng_state: torch.Tensor) -> None:
    tensors, info = {RNG_TENSOR: rng_state}, {}
    for name, q in layers.items():
        parts, info[name] = qweight_parts(name, q)
        tensors.update(parts)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps(info, sort_keys=True)
    save_file(tensors, str(path), metadata={"format": PROGRESS_FORMAT, "layers": text,
                                            "sha256": _digest(tensors, text)})


def read_block(path: Path, shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, QuantizedWeight], torch.Tensor]:
    """The block's weights (checked against the linears' ``shapes``) and the RNG state after it;
    ValueError saying what is wrong when the file is damaged."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise ValueError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    text = metadata.get("layers", "")
    if metadata.get("format") != PROGRESS_FORMAT or metadata.get("sha256") != _digest(tensors, text):
        raise ValueError("checksum mismatch")
    info = json.loads(text)
    if set(info) != set(shapes):
        raise ValueError("it holds other layers than this block's")
    layers = {}
    for name, shape in shapes.items():
        q = qweight_from_parts(name, tensors, info[name])
        if (q.out_features, q.in_features) != tuple(shape) or tuple(q.codes.shape) != tuple(shape):
            raise ValueError(f"{name} is {q.out_features}x{q.in_features}, the model's is {shape[0]}x{shape[1]}")
        layers[name] = q
    return layers, tensors[RNG_TENSOR]


# -- the progress directory of one run ----------------------------------------------------------

def _lock(folder: Path) -> int:
    with write_errors(folder):
        fd = os.open(folder / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AnybitError(f"another anybit run is writing {folder} right now; wait for it to finish") from None
    return fd


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != PROGRESS_FORMAT or not isinstance(manifest.get("fingerprint"), dict):
            raise ValueError("not an anybit progress file")
    except FileNotFoundError:
        raise AnybitError(f"{folder} is not the progress of an anybit run ({MANIFEST} missing): "
                          f"move it away or {START_OVER}") from None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise AnybitError(f"{path} is damaged ({exc}): {START_OVER}") from None
    if manifest.get("version") != PROGRESS_VERSION:
        raise AnybitError(f"{path} has progress format version {manifest.get('version')!r}, this anybit "
                          f"writes {PROGRESS_VERSION}: {START_OVER}")
    return manifest


@contextmanager
def progress_for(out, run_fingerprint: dict, overwrite: bool = False):
    """The run's ``RunProgress`` (None without an output directory), unlocked on leaving. It stays
    on disk for a resume unless nothing was saved; ``discard_progress`` removes it once the
    output is published."""
    if out is None:
        yield None
        return
    progress = RunProgress.open(out, run_fingerprint, overwrite)
    try:
        yield progress
    finally:
        progress.close()
        if _nothing_saved(progress.folder):
            shutil.rmtree(progress.folder, ignore_errors=True)


def discard_progress(out) -> None:
    shutil.rmtree(progress_dir(out), ignore_errors=True)


def _nothing_saved(folder: Path) -> bool:
    """A run that stopped before its first block or plan (say on a budget it could not reach)
    leaves nothing worth refusing a corrected command for."""
    return not (folder / PLAN_FILE).exists() and not (folder / block_file(0)).exists()


class RunProgress:
    """The locked progress directory of one run; ``pipeline.quantize_model`` calls the
    ``restore_plan``/``save_plan`` and ``load_block``/``save_block`` hooks."""

    def __init__(self, folder: Path, lock_fd: int):
        self.folder = folder
        self._lock_fd = lock_fd
        self.finished = 0  # blocks 0 .. finished-1 are on disk
        while (folder / block_file(self.finished)).is_file():
            self.finished += 1
        self.resumed = self.finished
        for entry in folder.iterdir():  # temporaries of a killed writer; the lock says none is alive
            if entry.name.startswith(".") and entry.is_file():
                entry.unlink(missing_ok=True)

    @classmethod
    def open(cls, out, run_fingerprint: dict, overwrite: bool = False) -> RunProgress:
        """Resume the progress of the same run, or start a new one; refuse a different run's."""
        folder = progress_dir(out)
        if folder.exists() and not folder.is_dir():
            raise AnybitError(f"{folder} exists and is not a directory: move it away")
        with write_errors(folder):
            remove_stale(folder)
        if folder.is_dir():
            fd = _lock(folder)
            try:
                if not (overwrite or _nothing_saved(folder)):
                    difference = first_difference(_read_manifest(folder)["fingerprint"], run_fingerprint)
                    if difference is None:
                        return cls(folder, fd)
                    raise AnybitError(f"{folder} holds an interrupted run with {difference}: rerun that command "
                                      f"to resume it, or {START_OVER}")
                with write_errors(folder):
                    shutil.rmtree(folder)
            except BaseException:
                os.close(fd)  # a refused or failed open must not keep the run locked in this process
                raise
            os.close(fd)
        manifest = {"format": PROGRESS_FORMAT, "version": PROGRESS_VERSION, "fingerprint": run_fingerprint}
        with atomic_directory(folder) as tmp:
            write_json_atomic(tmp / MANIFEST, manifest)
        return cls(folder, _lock(folder))

    def _damaged(self, path: Path, why, redo: str) -> AnybitError:
        return AnybitError(f"{path} is damaged ({why}): delete it to redo {redo}, or {START_OVER}")

    # -- the planning pass --
    def restore_plan(self, method) -> bool:
        """Put a saved plan back into ``method``; False when none was saved."""
        path = self.folder / PLAN_FILE
        if not path.is_file():
            return False
        try:
            with warnings.catch_warnings():  # a damaged file also draws pickle warnings: the error says it all
                warnings.simplefilter("ignore")
                saved = torch.load(path, weights_only=True)
            state, rng = saved["method"], saved["rng"]
        except Exception as exc:  # torch.load fails in many ways; any of them means the file is bad
            raise self._damaged(path, type(exc).__name__, "the planning pass") from None
        if hasattr(method, "load_plan_state"):
            method.load_plan_state(state)
        else:  # a method without the hooks keeps its plan in its attributes (SKIM: _choices)
            vars(method).update(state)
        torch.set_rng_state(rng)
        return True

    def save_plan(self, method) -> None:
        state = method.plan_state() if hasattr(method, "plan_state") else dict(vars(method))
        saved = {"method": state, "rng": torch.get_rng_state()}
        write_file_atomic(self.folder / PLAN_FILE, lambda tmp: torch.save(saved, tmp))

    # -- the quantizing pass --
    def load_block(self, b: int, shapes: dict[str, tuple[int, int]]) -> dict[str, QuantizedWeight] | None:
        """Block ``b``'s saved weights (by full layer name), or None when it still has to be done.
        Also restores the RNG state the uninterrupted run had after this block."""
        if b >= self.finished:
            return None
        path = self.folder / block_file(b)
        try:
            layers, rng = read_block(path, shapes)
        except (ValueError, TypeError, KeyError) as exc:
            raise self._damaged(path, exc, f"block {b} and later ones") from None
        torch.set_rng_state(rng)
        return layers

    def save_block(self, b: int, layers: dict[str, QuantizedWeight]) -> None:
        rng = torch.get_rng_state()
        write_file_atomic(self.folder / block_file(b), lambda tmp: write_block(tmp, layers, rng))
        self.finished = max(self.finished, b + 1)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
