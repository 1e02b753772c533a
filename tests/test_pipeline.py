import inspect

import pytest
import torch

from anybit.methods import build_method
from anybit.models import block_linears, decoder_blocks
from anybit.pipeline import (
    CACHE_ARGUMENTS, add_gram, capture_block_inputs, collect_stats, quantize_model, run_block, sequential_groups,
)


def _samples(n=4, seqlen=32, vocab=64, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_block_replay_reproduces_model_hidden_states(llama):
    samples = _samples()
    with torch.no_grad():
        ref = llama(samples, output_hidden_states=True, use_cache=False).hidden_states
    hiddens, kwargs = capture_block_inputs(llama, samples, batch_size=2, device="cpu")
    assert not set(CACHE_ARGUMENTS) & set(kwargs[0]) and kwargs[0]["use_cache"] is False
    for i, block in enumerate(decoder_blocks(llama)):
        assert torch.equal(torch.cat(hiddens), ref[i])
        hiddens = run_block(block, hiddens, kwargs)
    assert torch.allclose(llama.model.norm(torch.cat(hiddens)), ref[-1], atol=1e-6)


def test_replay_with_a_cache_would_leak_between_samples(llama):
    """The pitfall the pipeline avoids: a block holding a KV cache sees earlier samples."""
    from transformers import DynamicCache

    samples = _samples(n=2)
    hiddens, kwargs = capture_block_inputs(llama, samples, batch_size=1, device="cpu")
    block = decoder_blocks(llama)[0]
    clean = run_block(block, hiddens, kwargs)
    cache = DynamicCache(config=llama.config)
    name = next(n for n in CACHE_ARGUMENTS if n in inspect.signature(block.forward).parameters)
    with torch.no_grad():
        leaky = [block(h, **{**kw, name: cache, "use_cache": True}) for h, kw in zip(hiddens, kwargs)]
    leaky = [o[0] if isinstance(o, tuple) else o for o in leaky]
    assert torch.equal(leaky[0], clean[0]) and not torch.allclose(leaky[1], clean[1])


def test_sequential_groups_follow_shared_inputs(llama):
    hiddens, kwargs = capture_block_inputs(llama, _samples(n=1), 1, "cpu")
    groups = sequential_groups(decoder_blocks(llama)[0], hiddens[0], kwargs[0])
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_hessian_is_mean_outer_product_of_inputs(llama):
    samples = _samples(n=2)
    hiddens, kwargs = capture_block_inputs(llama, samples, 2, "cpu")
    block = decoder_blocks(llama)[0]
    seen = []
    handle = block.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    stats = collect_stats(block, [["mlp.down_proj"]], hiddens, kwargs)["mlp.down_proj"]
    handle.remove()
    x = torch.cat(seen)
    assert stats.n_tokens == x.shape[0] == 2 * 32
    assert torch.allclose(stats.hessian, x.t() @ x / x.shape[0], atol=1e-5)


def test_quantize_model_replaces_every_block_linear(llama):
    samples = _samples(n=4)
    before = {n: m.weight.clone() for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear)}
    for method, bits, group in (("rtn", 4, 0), ("gptq", 3, 32), ("squeezellm", 3, 0)):
        model = type(llama)(llama.config).eval()
        model.load_state_dict(llama.state_dict())
        result = quantize_model(model, samples, build_method(method, bits, group), progress=False)
        assert len(result.layers) == 2 * 7
        for name, q in result.layers.items():
            w = dict(model.named_modules())[name].weight
            assert torch.equal(w, q.dequantize()) and not torch.equal(w, before[name])
        assert torch.equal(model.lm_head.weight, before["lm_head"])
        # Honest bits: codes plus fp16 grids (scale+zero per row/group, or 2^b entries per row).
        def per_row_extra(q):
            groups = -(-q.in_features // group) if group else 1
            return 16 * 2**bits if method == "squeezellm" else 32 * groups

        expected = sum(q.numel * bits + q.out_features * per_row_extra(q) for q in result.layers.values())
        assert result.total_bits() == expected
        assert result.index_bits_per_weight() == bits


def test_gptq_calibrated_model_is_closer_to_fp_than_rtn(llama):
    samples = _samples(n=8, seqlen=64)
    with torch.no_grad():
        ref = llama(samples, use_cache=False).logits
    errs = {}
    for method in ("rtn", "gptq"):
        model = type(llama)(llama.config).eval()
        model.load_state_dict(llama.state_dict())
        quantize_model(model, samples, build_method(method, 2, 0), progress=False)
        with torch.no_grad():
            errs[method] = float((model(samples, use_cache=False).logits - ref).pow(2).mean())
    assert errs["gptq"] < errs["rtn"]


def test_linears_found_per_block(llama):
    assert len(block_linears(decoder_blocks(llama)[0])) == 7


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_gram_is_the_fp32_product_of_the_inputs(device, dtype):
    x = (torch.randn(300, 48, generator=torch.Generator().manual_seed(0)) * 4).to(dtype).to(device)
    h = torch.ones(48, 48, device=device)
    add_gram(h, x)
    want = 1 + x.double().t() @ x.double()
    assert h.dtype == torch.float32
    assert torch.allclose(h.double(), want, rtol=1e-5, atol=1e-3)
