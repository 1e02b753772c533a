import torch

from anybit.methods.skim import SKIM, candidate_widths
from anybit.pipeline import LinearStats
from anybit.quant.kmeans import kmeans_codebooks
from anybit.quant.lfull import row_output_error
from anybit.quant.scaling import scaled_reconstruction, train_scaling_vector
from tests.conftest import correlated_inputs


def _layer(rows=96, cols=128, seed=0):
    x = correlated_inputs(2048, cols, seed=seed)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[:, :4] *= 5  # a few loud input channels
    return w, LinearStats(x.t() @ x / x.shape[0], x.shape[0])


def test_scaling_vector_never_increases_lfull():
    for seed in range(3):
        w, stats = _layer(seed=seed)
        s = stats.act_sq[None, :].expand_as(w).contiguous()
        lut, codes = kmeans_codebooks(w, s, 3)
        a, before, after = train_scaling_vector(w, s, stats.hessian, codes, 8, steps=30)
        assert after <= before
        recon = scaled_reconstruction(w, s, codes, 8, a.log())
        assert torch.isclose(row_output_error(w, recon, stats.hessian).sum(), torch.tensor(after), rtol=1e-4)


def test_skim_keeps_lfull_no_worse_than_each_step_before():
    w, stats = _layer(seed=5)
    q = SKIM(3.25, scaling=True, scaling_steps=20, feedback=True).quantize(w, stats, "layer")
    lfull = float(row_output_error(w, q.dequantize(), stats.hessian).sum())
    assert abs(lfull - q.meta["lfull"]) <= 1e-3 * lfull
    if q.meta.get("feedback") == "kept":
        assert q.meta["lfull"] < q.meta["lfull_before_feedback"]
    assert abs(q.bits_per_weight() - 3.25) <= 0.01 + 16 * 128 / w.numel()


def test_greedy_allocation_close_to_lagrangian_bound():
    w, stats = _layer(rows=256, seed=2)
    q = SKIM(3.25, scaling=False, feedback=False).quantize(w, stats, "layer")
    assert -1e-9 <= q.meta["alloc_gap"] < 0.01


def test_candidate_widths_follow_the_codebook_cost():
    assert candidate_widths(3.25, 576) == (2, 3, 4)
    assert candidate_widths(2.25, 576) == (1, 2, 3)
    assert candidate_widths(4.5, 4096) == (3, 4, 5)
    assert candidate_widths(4.0, 4096) == (2, 3, 4)  # 4-bit codes + a 16-entry fp16 codebook exceed 4.0
