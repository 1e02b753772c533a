import pytest
import torch

from anybit.nn import AnybitLinear
from anybit.nn import linear as linear_module
from anybit.nn.reference import codes_at
from anybit.formats.bitpack import pack_bitplanes
from tests.formats.random_qweights import all_kinds, random_lut, with_extras

KINDS = all_kinds()


def _module(kind, bias=True):
    q = KINDS[kind]
    b = torch.randn(q.out_features, generator=torch.Generator().manual_seed(1)) if bias else None
    return q, AnybitLinear.from_quantized(q, b)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_dense_dequantized_weight(kind):
    q, m = _module(kind)
    x = torch.randn(2, 3, q.in_features, generator=torch.Generator().manual_seed(2))
    expected = x @ q.dequantize().t() + m.bias
    assert torch.allclose(m(x), expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(m.dequantize(), q.dequantize())


@pytest.mark.parametrize("kind", ["lut-rows", "lut-cols", "affine-groups"])
def test_weight_at_reads_single_weights_without_unpacking(kind):
    q, m = _module(kind)
    plain = q.dequantize() if q.outliers is None else _without_outliers(q)
    rows, cols = torch.meshgrid(torch.arange(q.out_features), torch.arange(q.in_features), indexing="ij")
    assert torch.equal(m.weight_at(rows.reshape(-1), cols.reshape(-1)), plain.reshape(-1))


def _without_outliers(q):
    outliers, q.outliers = q.outliers, None
    try:
        return q.dequantize()
    finally:
        q.outliers = outliers


def test_codes_at_matches_unpacking():
    codes = torch.randint(0, 32, (5, 70), dtype=torch.uint8)
    rows, cols = torch.arange(5).repeat_interleave(70), torch.arange(70).repeat(5)
    assert torch.equal(codes_at(pack_bitplanes(codes, 5), 5, rows, cols), codes.reshape(-1).long())


def test_casting_the_model_keeps_packed_tensors_as_stored():
    q, m = _module("lut-rows")
    before = {name: t.clone() for name, t in m.packed().items()}
    m.half()
    assert m.bias.dtype == torch.float16
    for name, t in m.packed().items():
        assert t.dtype == before[name].dtype and torch.equal(t, before[name])
    x = torch.randn(4, q.in_features)
    y = m(x.half())
    assert y.dtype == torch.float16
    assert torch.allclose(y.float(), m.float()(x), atol=0.05, rtol=0.01)


def test_state_dict_is_the_packed_layout():
    _, m = _module("affine-groups")
    assert set(m.state_dict()) == set(m.spec.tensor_specs())


def test_cpu_never_asks_for_kernels(monkeypatch):
    called = []
    monkeypatch.setattr(linear_module, "_kernels", lambda: called.append(1))
    q, m = _module("lut-rows")
    m(torch.randn(1, q.in_features))
    assert not called


def test_kernel_path_only_for_row_codebooks_on_cuda(monkeypatch):
    """Which path a forward takes, without a GPU: the kernel path needs per-row codebooks, a
    CUDA input and kernels that are switched on; everything else decodes for one dense matmul."""
    class FakeKernels:
        @staticmethod
        def use_triton(x):
            return True

    class CudaLike:
        is_cuda = True

    monkeypatch.setattr(linear_module, "_kernels", lambda: FakeKernels)
    rows = AnybitLinear.from_quantized(random_lut(8, 40, 0, seed=1))
    cols = AnybitLinear.from_quantized(random_lut(8, 40, 1, seed=2))
    assert rows.uses_kernel(CudaLike()) and not cols.uses_kernel(CudaLike())
    assert not rows.uses_kernel(torch.zeros(1))


def test_kernel_path_matches_dense_path(monkeypatch):
    """The block-by-block path (row blocks, reordering, input scale, permutation, outlier
    correction) against the dense product, with the kernels' own reference standing in."""
    import anybit.kernels as kernels

    for seed in range(4):
        q = with_extras(random_lut(24, 70, 0, seed=seed), seed=seed)
        module = AnybitLinear.from_quantized(q)
        x = torch.randn(3, 70, generator=torch.Generator().manual_seed(seed))
        dense = module(x)
        monkeypatch.setattr(linear_module, "_kernels", lambda: kernels)
        monkeypatch.setattr(AnybitLinear, "uses_kernel", lambda self, x: True)
        assert torch.allclose(module(x), dense, atol=1e-4, rtol=1e-4)
        monkeypatch.undo()


def test_kernel_operands_follow_weights_loaded_in_place(monkeypatch):
    """The kernel path caches what it derives from the buffers; loading a state dict copies new
    values into the same storage, and must not leave the old corrections in use."""
    import anybit.kernels as kernels

    first = AnybitLinear.from_quantized(with_extras(random_lut(24, 70, 0, seed=1), seed=1))
    second = AnybitLinear.from_quantized(with_extras(random_lut(24, 70, 0, seed=1), seed=2))
    assert first.spec == second.spec
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(0))
    want = second(x)
    monkeypatch.setattr(linear_module, "_kernels", lambda: kernels)
    monkeypatch.setattr(AnybitLinear, "uses_kernel", lambda self, x: True)
    first(x)  # fills the cache
    first.load_state_dict(second.state_dict())
    assert torch.allclose(first(x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_bmma_operands_kept_when_requested(monkeypatch, device):
    """ANYBIT_KERNELS=bmma: blocks of up to 4 bits carry the binary tensor-core operands and the
    product is unchanged (on CUDA the Gluon kernel runs them at batches up to 3 or 4, wider blocks
    the FMA / dot kernels; on the CPU the kernels' reference stands in)."""
    import anybit.kernels as kernels

    q = with_extras(random_lut(40, 300, 0, seed=3), seed=3)
    module = AnybitLinear.from_quantized(q).to(device)
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(3)).to(device)
    dense = torch.nn.functional.linear(x, module.dequantize(torch.float32))
    monkeypatch.setenv("ANYBIT_KERNELS", "bmma")
    if device == "cpu":
        monkeypatch.setattr(linear_module, "_kernels", lambda: kernels)
        monkeypatch.setattr(AnybitLinear, "uses_kernel", lambda self, x: True)
    for batch in (1, 2):
        err = float((module(x[:batch]) - dense[:batch]).norm() / dense[:batch].norm())
        assert err < 1e-3, err  # the kernels' tolerance (fp16 products in the FMA kernel)
    kept = {b[2]: len(b) > 4 for b in module.kernel_operands()["blocks"]}
    assert kept and all(has == (bits <= 4) for bits, has in kept.items()), kept
    monkeypatch.delenv("ANYBIT_KERNELS")  # the cached operands follow the setting
    assert all(len(b) == 4 for b in module.kernel_operands()["blocks"])


def test_stacked_module_computes_the_linears_outputs_in_turn():
    weights = [with_extras(random_lut(7 + s, 45, 0, seed=s), seed=s, outliers=2 + s) for s in range(3)]
    for w in weights[1:]:
        w.perm, w.input_scale = weights[0].perm, weights[0].input_scale
    bias = torch.randn(weights[1].out_features)
    linears = [AnybitLinear.from_quantized(w, bias if i == 1 else None) for i, w in enumerate(weights)]
    stacked = AnybitLinear.stacked(linears)
    x = torch.randn(3, 45, generator=torch.Generator().manual_seed(3))
    assert stacked.out_features == sum(m.out_features for m in linears)
    assert torch.allclose(stacked(x), torch.cat([m(x) for m in linears], -1), atol=1e-5, rtol=1e-5)
