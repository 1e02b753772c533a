import torch

from anybit.quant.kmeans import (
    assign_nearest, exact_kmeans_1d, kmeans_codebooks, uniform_grid, weighted_kmeans_1d, weighted_sse,
)


def _rows(r=24, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, n, generator=g) * torch.rand(r, 1, generator=g)
    x[:, :3] *= 6  # heavy tails, as in LLM weights
    s = torch.rand(r, n, generator=g) ** 3 + 1e-3
    return x, s


def test_lloyd_is_close_to_exact_solver():
    x, s = _rows()
    for k in (2, 4, 8):
        c, a = weighted_kmeans_1d(x, s, k)
        got = weighted_sse(x, s, c, a)
        exact = torch.tensor([exact_kmeans_1d(x[i], s[i], k) for i in range(x.shape[0])])
        assert (got >= exact - 1e-4 * exact.abs() - 1e-6).all()  # the solver is exact
        ratio = (got / exact.clamp_min(1e-12)).mean()
        assert ratio < 1.05, f"k={k}: Lloyd {ratio:.3f}x the optimum on average"


def test_never_worse_than_uniform_grid():
    x, s = _rows(seed=3)
    for k in (2, 4, 8, 16):
        grid = uniform_grid(x, k)
        uniform = weighted_sse(x, s, grid, assign_nearest(x, grid))
        c, a = weighted_kmeans_1d(x, s, k)
        assert (weighted_sse(x, s, c, a) <= uniform + 1e-6).all()


def test_batched_equals_row_by_row():
    x, s = _rows(r=6, seed=4)
    c, a = weighted_kmeans_1d(x, s, 8)
    for i in range(6):
        ci, ai = weighted_kmeans_1d(x[i : i + 1], s[i : i + 1], 8)
        assert torch.allclose(ci, c[i : i + 1], atol=1e-6) and torch.equal(ai, a[i : i + 1])


def test_weights_pull_centroids():
    x = torch.tensor([[0.0, 1.0, 2.0, 10.0]])
    heavy_on_ten = torch.tensor([[1.0, 1.0, 1.0, 100.0]])
    c, a = weighted_kmeans_1d(x, heavy_on_ten, 2)
    assert torch.isclose(c[0, 1], torch.tensor(10.0)) and a[0, 3] == 1


def test_codebooks_are_fp16_and_codes_nearest():
    x, s = _rows(seed=5)
    lut, codes = kmeans_codebooks(x, s, 3)
    assert lut.dtype == torch.float16 and lut.shape == (x.shape[0], 8)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 8
    deq = torch.gather(lut.float(), 1, codes.long())
    dist = (x[:, :, None] - lut.float()[:, None, :]).abs()
    assert torch.allclose((deq - x).abs(), dist.min(-1).values)
