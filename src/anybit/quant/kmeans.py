"""Weighted 1-D k-means, batched over the rows of a matrix.

Each row gets its own codebook minimising sum_j s_j (x_j - c(x_j))^2. Lloyd's iterations alone
stall in poor local optima on heavy-tailed rows (measured: 2.5x the optimum at k=8), so the main
start is an exact dynamic program over a fine binning of each row -- bin edges at both uniform
and weighted-quantile positions, so isolated outliers keep bins of their own -- refined by
Lloyd's iterations on the real values. A second start from the min-max uniform grid is kept
when better, so the objective is never above the uniform grid's. Everything is batched over
rows. ``exact_kmeans_1d`` (dynamic programming on the raw values) is the reference in tests.
"""

from __future__ import annotations

import torch

from anybit.timing import timed


def assign_nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each entry of ``x`` (R, n); ``centroids`` (R, k) sorted."""
    mid = (centroids[:, 1:] + centroids[:, :-1]) * 0.5
    return torch.searchsorted(mid.contiguous(), x.contiguous())


def decode(lut: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Per-row codebook lookup: value (R, n) of each code under its row's codebook, fp32."""
    return torch.gather(lut.float(), 1, codes.long())


def weighted_sse(x: torch.Tensor, s: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Per-row objective sum_j s_j (x_j - c[assign_j])^2."""
    return (s * (x - torch.gather(centroids, 1, assign)) ** 2).sum(1)


def uniform_grid(x: torch.Tensor, k: int) -> torch.Tensor:
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    steps = torch.linspace(0, 1, k, dtype=x.dtype, device=x.device)
    return lo + (hi - lo) * steps


def weighted_quantiles(x: torch.Tensor, s: torch.Tensor, k: int) -> torch.Tensor:
    """Centroids at the weighted quantiles (i + 0.5) / k of each row."""
    xs, order = x.sort(1)
    cw = torch.gather(s, 1, order).cumsum(1)
    total = cw[:, -1:].clamp_min(torch.finfo(x.dtype).tiny)
    targets = (torch.arange(k, dtype=x.dtype, device=x.device) + 0.5) / k * total
    idx = torch.searchsorted(cw.contiguous(), targets.contiguous()).clamp_max(x.shape[1] - 1)
    return torch.gather(xs, 1, idx)


def lloyd(x: torch.Tensor, s: torch.Tensor, centroids: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Lloyd iterations from ``centroids``; the objective never increases."""
    c = centroids.sort(1).values
    a = assign_nearest(x, c)
    for _ in range(iters):
        sums = torch.zeros_like(c).scatter_add_(1, a, s * x)
        mass = torch.zeros_like(c).scatter_add_(1, a, s)
        c = torch.where(mass > 0, sums / mass.clamp_min(torch.finfo(x.dtype).tiny), c).sort(1).values
        new = assign_nearest(x, c)
        if torch.equal(new, a):
            break
        a = new
    return c, a


def _bin_edges(x: torch.Tensor, s: torch.Tensor, bins: int) -> torch.Tensor:
    half = bins // 2
    uniform = uniform_grid(x, half + 1)[:, 1:-1]
    quantile = weighted_quantiles(x, s, half)[:, :-1]
    return torch.cat([uniform, quantile], 1).sort(1).values


def binned_dp_centroids(x: torch.Tensor, s: torch.Tensor, k: int, bins: int = 64, chunk: int = 512) -> torch.Tensor:
    """Optimal k centroids for each row's binned values (R, k), by DP over bin prefix sums."""
    out = []
    for r0 in range(0, x.shape[0], chunk):
        xc, sc = x[r0 : r0 + chunk], s[r0 : r0 + chunk]
        edges = _bin_edges(xc, sc, bins)
        b = torch.searchsorted(edges.contiguous(), xc.contiguous())
        nb = edges.shape[1] + 1
        # Rows are centred and scaled first so float32 prefix sums lose little to cancellation.
        mu, sd_ = xc.mean(1, keepdim=True), xc.std(1, keepdim=True).clamp_min(1e-12)
        xd, sd = (xc - mu) / sd_, sc / sc.mean(1, keepdim=True).clamp_min(1e-30)
        stats = [torch.zeros(xc.shape[0], nb, dtype=xd.dtype, device=x.device).scatter_add_(1, b, v)
                 for v in (sd, sd * xd, sd * xd * xd)]
        pw, pwx, pwxx = (torch.nn.functional.pad(t.cumsum(1), (1, 0)) for t in stats)
        i = torch.arange(nb + 1, device=x.device)
        lower = i[:, None] < i[None, :]  # segment (i, j]: bins i..j-1
        mass = pw[:, None, :] - pw[:, :, None]
        wx = pwx[:, None, :] - pwx[:, :, None]
        cost = (pwxx[:, None, :] - pwxx[:, :, None]) - wx * wx / mass.clamp_min(1e-30)
        cost = torch.where(lower & (mass > 0), cost.clamp_min(0), torch.where(lower, 0.0, torch.inf))
        best = cost[:, 0, :]
        cost_t = cost.transpose(1, 2).contiguous()  # [r, j, i]: reduce over the last, contiguous axis
        choices = []
        for _ in range(1, k):
            best, arg = (best[:, None, :] + cost_t).min(2)
            choices.append(arg)
        # Walk back from the last bin: each step gives one cluster's bin range.
        rows = torch.arange(xc.shape[0], device=x.device)
        end = torch.full((xc.shape[0],), nb, dtype=torch.long, device=x.device)
        cents = []
        for arg in reversed(choices):
            start = arg[rows, end]
            cents.append(_segment_mean(pwx, pw, start, end, rows))
            end = start
        cents.append(_segment_mean(pwx, pw, torch.zeros_like(end), end, rows))
        c = torch.stack(cents[::-1], 1)
        # Empty clusters (zero mass) get a neighbour's value; Lloyd then ignores them.
        c = torch.where(torch.isnan(c), torch.nan_to_num(c, nan=0.0).cummax(1).values, c)
        out.append(c * sd_ + mu)
    return torch.cat(out)


def _segment_mean(pwx, pw, start, end, rows):
    mass = pw[rows, end] - pw[rows, start]
    return torch.where(mass > 0, (pwx[rows, end] - pwx[rows, start]) / mass.clamp_min(1e-30), torch.nan)


DP_MAX_K = 32  # past this (6+ bits) the DP costs more than it gains; a mixed grid starts Lloyd


def mixed_grid(x: torch.Tensor, s: torch.Tensor, k: int) -> torch.Tensor:
    """Half uniform, half weighted-quantile centroids: covers both the tails and the bulk."""
    return torch.cat([uniform_grid(x, k // 2), weighted_quantiles(x, s, k - k // 2)], 1).sort(1).values


def weighted_kmeans_1d(
    x: torch.Tensor, s: torch.Tensor | None, k: int, iters: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row weighted k-means. ``x``, ``s``: (R, n). Returns sorted centroids (R, k), codes (R, n)."""
    x = x.float()
    s = torch.ones_like(x) if s is None else s.float().expand_as(x).contiguous()
    best_c = uniform_grid(x, k)  # the fallback that makes "never above the uniform grid" hold
    best_a = assign_nearest(x, best_c)
    best_err = weighted_sse(x, s, best_c, best_a)
    start = binned_dp_centroids(x, s, k, max(64, 4 * k)) if k <= DP_MAX_K else mixed_grid(x, s, k)
    c, a = lloyd(x, s, start, iters)
    err = weighted_sse(x, s, c, a)
    better = err < best_err
    best_c = torch.where(better[:, None], c, best_c)
    best_a = torch.where(better[:, None], a, best_a)
    return best_c, best_a


def exact_kmeans_1d(x: torch.Tensor, s: torch.Tensor, k: int) -> float:
    """Optimal weighted 1-D k-means objective by dynamic programming over sorted values, O(k n^2)."""
    x = x.double()
    s = s.double()
    order = x.argsort()
    xs, ws = x[order], s[order]
    zero = torch.zeros(1, dtype=torch.float64)
    cw = torch.cat([zero, ws.cumsum(0)])
    cwx = torch.cat([zero, (ws * xs).cumsum(0)])
    cwxx = torch.cat([zero, (ws * xs * xs).cumsum(0)])
    n = x.numel()
    i = torch.arange(n + 1)[:, None]
    j = torch.arange(n + 1)[None, :]
    mass = cw[j] - cw[i]
    mean_sq = (cwx[j] - cwx[i]) ** 2 / mass.clamp_min(1e-30)
    cost = torch.where(j > i, (cwxx[j] - cwxx[i]) - mean_sq, torch.full_like(mass, float("inf")))
    best = cost[0].clone()  # one cluster over x[0:j]
    for _ in range(1, k):
        best = torch.minimum(best, (best[:, None] + cost).min(0).values)
    return float(best[n])


@timed("kmeans")
def kmeans_codebooks(x: torch.Tensor, s: torch.Tensor | None, bits: int, iters: int = 50):
    """Per-row fp16 codebooks of 2**bits entries and the codes that index them.

    Centroids are rounded to fp16 (what is stored) before the final assignment, so codes and
    codebook reconstruct exactly what a checkpoint will hold.
    """
    centroids, _ = weighted_kmeans_1d(x, s, 2**bits, iters)
    lut = centroids.to(torch.float16).float().sort(1).values
    codes = assign_nearest(x.float(), lut)
    return lut.to(torch.float16), codes.to(torch.uint8)


def codebooks_at_widths(x: torch.Tensor, s: torch.Tensor, bits: torch.Tensor):
    """Per-row codebooks at each row's own width: (lut (R, 2^max) fp16, codes (R, n) uint8)."""
    lut = torch.zeros(x.shape[0], 2 ** int(bits.max()), dtype=torch.float16, device=x.device)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    for b in bits.unique().tolist():
        sel = bits == b
        lut[sel, : 2**b], codes[sel] = kmeans_codebooks(x[sel], s[sel], b)
    return lut, codes
