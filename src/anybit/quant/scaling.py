"""SKIM's trainable scaling vector: one scale per input column, learned through fixed clusters.

Cluster W diag(a) instead of W. With the cluster assignments fixed, each centroid is the
weighted mean of its members, so W_hat(a) = C(a)[codes] diag(a)^-1 is differentiable in ``a``;
``a`` is trained by gradient descent on the layer-output error (L-full). Sensitivities carry
over to the scaled space as s / a^2, so the k-means objective still measures original-space
error. The vector returned never has a higher L-full than no scaling: the start (a = 1) is
kept when training does not improve on it.
"""

from __future__ import annotations

import torch

from anybit.quant.lfull import row_output_error
from anybit.timing import timed


def centroids_given_codes(v: torch.Tensor, s: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
    """Weighted mean of each row's members per code (R, k); empty codes get 0."""
    codes = codes.long()
    sums = torch.zeros(v.shape[0], k, dtype=v.dtype, device=v.device).scatter_add(1, codes, s * v)
    mass = torch.zeros(v.shape[0], k, dtype=v.dtype, device=v.device).scatter_add(1, codes, s)
    return sums / mass.clamp_min(1e-20)


def scaled_reconstruction(w, s, codes, k, log_a):
    a = log_a.exp()
    v = w * a
    cent = centroids_given_codes(v, s / a**2, codes, k)
    return torch.gather(cent, 1, codes.long()) / a


@timed("scaling")
def train_scaling_vector(w: torch.Tensor, s: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, k: int,
                         steps: int = 60, lr: float = 0.02) -> tuple[torch.Tensor, float, float]:
    """Return (a, L-full before, L-full after) with assignments ``codes`` fixed."""
    w, s, h = w.float(), s.float(), h.float()
    log_a = torch.zeros(w.shape[1], device=w.device, requires_grad=True)
    opt = torch.optim.Adam([log_a], lr=lr)
    scale = 1.0 / max(float(torch.diag(h).mean()) * w.shape[0], 1e-20)  # keeps Adam's step size meaningful
    best_loss, best = None, torch.zeros_like(log_a)
    with torch.enable_grad():
        for step in range(steps + 1):
            w_hat = scaled_reconstruction(w, s, codes, k, log_a)
            loss = row_output_error(w, w_hat, h).sum()
            value = float(loss.detach())
            if best_loss is None or value < best_loss:
                best_loss, best = value, log_a.detach().clone()
            if step == 0:
                start_loss = value
            opt.zero_grad()
            (loss * scale).backward()
            opt.step()
    return best.exp(), start_loss, best_loss
