"""Perplexity with the GPTQ protocol: non-overlapping windows from the start of a token stream."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from anybit.errors import AnybitError


@dataclass
class Perplexity:
    ppl: float
    windows: int
    seqlen: int
    tokens_scored: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 512, max_windows: int | None = 64,
               batch_size: int = 4, device: str | torch.device = "cpu", progress: bool = True) -> Perplexity:
    """exp(sum_w mean_nll(w) * seqlen / (windows * seqlen)), each window's mean over seqlen-1 predictions."""
    n = ids.numel() // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise AnybitError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n * seqlen].view(n, seqlen)
    total = 0.0
    for start in tqdm(range(0, n, batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits.float()
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1)
        total += float(nll.mean(1).sum()) * seqlen
    return Perplexity(math.exp(total / (n * seqlen)), n, seqlen, n * (seqlen - 1))
