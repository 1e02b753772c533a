import pytest
import torch

from anybit.nn import AnybitLinear
from anybit.nn import linear as linear_module
from anybit.nn.reference import codes_at
from anybit.formats.bitpack import pack_bitplanes
from anybit.formats.packed import codes_name
from tests.formats.random_qweights import all_kinds, random_affine, random_lut, with_extras

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


def test_kernel_path_only_on_cuda_where_a_kernel_serves_the_grid(monkeypatch):
    """Which path a forward takes, without a GPU: per-row codebooks take their kernels on a CUDA input
    with kernels switched on; the other grids where ``grid_mode`` names a kernel for the call;
    everything else decodes for one dense matmul."""
    served = []

    class FakeKernels:
        @staticmethod
        def use_triton(x):
            return True

        @staticmethod
        def grid_mode(grid, lut_axis, group_size, x):
            served.append((grid, lut_axis, group_size))
            return 1 if grid == "lut" else None

    class CudaLike:
        is_cuda = True

    monkeypatch.setattr(linear_module, "_kernels", lambda: FakeKernels)
    rows = AnybitLinear.from_quantized(random_lut(8, 40, 0, seed=1))
    cols = AnybitLinear.from_quantized(random_lut(8, 40, 1, seed=2))
    affine = AnybitLinear.from_quantized(random_affine(8, 40, 32, seed=3))
    assert rows.uses_kernel(CudaLike()) and cols.uses_kernel(CudaLike()) and not affine.uses_kernel(CudaLike())
    assert served == [("lut", 1, 0), ("affine", 0, 32)]
    assert not rows.uses_kernel(torch.zeros(1)) and not cols.uses_kernel(torch.zeros(1))


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


def test_tiled_codes_are_the_one_copy_and_the_stored_layout_comes_back(monkeypatch):
    """keep_tiled_codes (what a GPU forward does where the tensor-core kernels run): blocks of up
    to 4 bits keep their codes in the tiled order only; the checkpoint layout, the packed tensors,
    the products (dense and block-by-block) and loading in place are unchanged."""
    import anybit.kernels as kernels

    q = with_extras(random_lut(40, 300, 0, seed=3, widths=(2, 6)), seed=3)
    module = AnybitLinear.from_quantized(q)
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(3))
    want, saved = module(x), {k: v.clone() for k, v in module.state_dict().items()}
    module.keep_tiled_codes()
    narrow = [bits for bits in module.spec.blocks if bits <= 4]
    assert narrow and module.kernel_order_widths() == narrow
    assert all(codes_name(b) not in dict(module.named_buffers()) for b in narrow)
    assert all(codes_name(b) in dict(module.named_buffers()) for b in module.spec.blocks if b > 4)
    state = module.state_dict()
    assert list(state) == list(saved) or set(state) == set(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert all(torch.equal(t, saved[k]) for k, t in module.packed().items())
    assert torch.equal(module(x), want)  # the dense path untiles
    monkeypatch.setattr(linear_module, "_kernels", lambda: kernels)
    monkeypatch.setattr(AnybitLinear, "uses_kernel", lambda self, x: True)
    blocks = module.kernel_operands()["blocks"]
    assert all((b[0] is None) == (b[2] <= 4) and (b[4] is not None) == (b[2] <= 4) for b in blocks)
    assert torch.allclose(module(x), want, atol=1e-4, rtol=1e-4)  # block by block, codes untiled per call
    module.half().float()  # casts keep the tiled codes and coefficients as they are
    assert module.kernel_order_widths() == narrow
    other = AnybitLinear.from_quantized(with_extras(random_lut(40, 300, 0, seed=3, widths=(2, 6)), seed=4))
    other.keep_tiled_codes()
    other.load_state_dict(module.state_dict())  # back to the stored order, then loaded in place
    assert other.kernel_order_widths() == [] and torch.allclose(other(x), want, atol=1e-4, rtol=1e-4)
    module.keep_stored_codes()
    assert module.kernel_order_widths() == [] and not any(n.startswith("tiled_") for n, _ in module.named_buffers())
    assert all(torch.equal(t, saved[k]) for k, t in module.state_dict().items())


def test_row_codes_of_per_column_codebooks_are_the_one_copy_and_the_stored_layout_comes_back():
    """keep_row_codes (what a GPU forward does where ``triton_grid`` runs): a per-column-codebook block's
    codes packed along its columns only; checkpoint layout, packed tensors and products unchanged."""
    q = with_extras(random_lut(40, 70, 1, seed=4, widths=(2, 5)), seed=4)
    module = AnybitLinear.from_quantized(q)
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(4))
    want, saved = module(x), {k: v.clone() for k, v in module.state_dict().items()}
    module.keep_row_codes()
    assert module.kernel_order_widths() == list(module.spec.blocks)
    buffers = dict(module.named_buffers())
    for bits, (cols, _) in module.spec.blocks.items():
        assert codes_name(bits) not in buffers and buffers[f"row_codes_{bits}"].shape == (40, -(-cols // 32) * bits)
    assert all(torch.equal(t, saved[k]) for k, t in module.state_dict().items()) and set(module.state_dict()) == set(saved)
    assert all(torch.equal(t, saved[k]) for k, t in module.packed().items())
    assert torch.equal(module(x), want)
    module.keep_stored_codes()
    assert module.kernel_order_widths() == [] and not any(n.startswith("row_codes") for n, _ in module.named_buffers())
    assert all(torch.equal(t, saved[k]) for k, t in module.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_forward_keeps_one_tiled_copy_and_matches_dense(dtype):
    """On a GPU the first forward tiles the blocks of up to 4 bits (the stored codes are dropped,
    so the codes' memory does not double) and every batch, through each kernel, matches the dense
    product: 1-2 rows binary tensor cores, 3-16 the fragment kernel (fp16) or the dot kernel
    (bf16, codes untiled per call), 17 rows the dot kernel."""
    import anybit.kernels as kernels

    q = with_extras(random_lut(200, 600, 0, seed=5, widths=(2, 5)), seed=5)
    module = AnybitLinear.from_quantized(q)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    module = module.cuda()
    stored = sum(t.numel() * t.element_size() for t in module.packed().values())
    x = torch.randn(17, 600, generator=torch.Generator().manual_seed(5)).cuda().to(dtype)
    dense = torch.nn.functional.linear(x.float(), module.dequantize(torch.float32))
    for batch in (1, 2, 3, 8, 17):
        err = float((module(x[:batch]).float() - dense[:batch]).norm() / dense[:batch].norm())
        assert err < 1e-2 if dtype == torch.bfloat16 else err < 1e-3, (batch, err)
    if kernels.tiled_codes_supported(x.device):
        assert module.kernel_order_widths() == [b for b in module.spec.blocks if b <= 4]
        resident = sum(t.numel() * t.element_size() for t in module.buffers())
        assert resident < 1.5 * stored, (resident, stored)  # padding and coefficients, not a second copy
    assert all(torch.equal(t.cpu(), saved[k]) for k, t in module.state_dict().items())  # the checkpoint layout
    on_cpu = module.cpu()
    assert torch.allclose(on_cpu(x[:3].cpu().float()), dense[:3].cpu(), atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_reads_planes_made_before_it_and_ignores_them_where_x_is_transformed():
    """``forward(x, planes=...)`` with the planes a fused op wrote (here ``x_planes`` itself) gives
    the same output as the module making them; a module that permutes or scales x first cannot use
    planes of the raw x and ignores them (planes of another x change nothing)."""
    from anybit.kernels import xplanes

    gen = torch.Generator().manual_seed(6)
    plain = AnybitLinear.from_quantized(random_lut(200, 600, 0, seed=6, widths=(3, 4))).cuda()
    x = torch.randn(1, 600, generator=gen).cuda().half()
    other = xplanes.x_planes(torch.randn(1, 600, generator=gen).cuda().half())
    assert torch.equal(plain(x, planes=xplanes.x_planes(x)), plain(x))
    transformed = AnybitLinear.from_quantized(with_extras(random_lut(200, 600, 0, seed=6, widths=(3, 4)), seed=6))
    transformed = transformed.cuda()
    assert transformed.spec.perm or transformed.spec.input_scale
    assert torch.equal(transformed(x, planes=other), transformed(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_plans_the_launches_of_decoding_batches_once():
    """Batches of 1 and 2 rows run a launch plan kept with the kernel operands (made on the first call,
    ``kernels.plan_linear_blocks``) and compute what ``lut_linear_blocks`` computes, bit for bit, with
    and without a permutation, input scale and outliers and with planes given; batches the plan does
    not serve keep None or nothing; new weights loaded in place get a new plan."""
    import anybit.kernels as kernels
    from anybit.kernels import xplanes

    gen = torch.Generator().manual_seed(7)
    plain = AnybitLinear.from_quantized(random_lut(200, 600, 0, seed=7, widths=(3, 4))).cuda()
    extras = AnybitLinear.from_quantized(with_extras(random_lut(200, 600, 0, seed=8, widths=(2, 3)), seed=8)).cuda()
    for module in (plain, extras):
        for batch in (1, 2, 1, 3, 17):
            x = torch.randn(batch, 600, generator=gen).cuda().half()
            ops = module.kernel_operands(x.device)
            xs = x[:, ops["perm"]] if ops["perm"] is not None else x
            want = kernels.lut_linear_blocks(xs, ops["blocks"], module.out_features, input_scale=ops["input_scale"],
                                             outliers=ops["outliers"])
            assert torch.equal(module(x), want), batch
        plans = module.kernel_operands()["plans"]
        assert plans[(1, torch.float16)] is not None and plans[(2, torch.float16)] is not None
        assert plans[(3, torch.float16)] is None and (17, torch.float16) not in plans
    x = torch.randn(1, 600, generator=gen).cuda().half()
    assert torch.equal(plain(x, planes=xplanes.x_planes(x)), plain(x))
    before = plain(x)
    doubled = {name: t * 2 if name.startswith("lut_") else t for name, t in plain.state_dict().items()}
    other = AnybitLinear(plain.spec).cuda()
    other.load_state_dict(doubled)
    plain.load_state_dict(doubled)
    assert torch.equal(plain(x), other(x)) and not torch.equal(plain(x), before)
    with pytest.raises(ValueError, match="x has 599 features, expected 600"):
        plain(x[:, 1:])


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
