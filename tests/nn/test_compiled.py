import copy
import pickle

import pytest
import torch

from anybit.nn import AnybitLinear, compiled
from tests.formats.random_qweights import all_kinds, random_lut, with_extras

KINDS = all_kinds()


def _compile(module, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(module, fullgraph=True, backend=backend)  # fullgraph: a graph break fails the test


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_forward_is_one_op_and_equals_eager(kind):
    q = KINDS[kind]
    module = AnybitLinear.from_quantized(q, torch.randn(q.out_features, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(2, 3, q.in_features, generator=torch.Generator().manual_seed(2))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    assert torch.equal(_compile(module, backend)(x), module(x))
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert ops == [torch.ops.anybit.linear.default], ops  # the whole forward, bias included, is the op
    assert torch.equal(_compile(module)(x), module(x))


def test_copies_are_other_layers_for_the_op():
    module = AnybitLinear.from_quantized(with_extras(random_lut(20, 48, 0, seed=3, widths=(2, 3)), seed=3))
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(4))
    for other in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert other._layer_id != module._layer_id
        for name, t in other.named_buffers():
            if name.startswith("lut_"):
                t.mul_(2)
        assert torch.equal(_compile(other)(x), other(x)) and not torch.equal(other(x), module(x))
    assert torch.equal(_compile(module)(x), module(x))


def test_a_layer_no_longer_alive_is_a_clear_error():
    module = AnybitLinear.from_quantized(random_lut(8, 32, 0, seed=5))
    layer = module._layer_id
    del module
    with pytest.raises(RuntimeError, match=f"layer {layer} no longer exists"):
        compiled.linear(torch.randn(1, 32), layer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dynamic", [False, True])
def test_cuda_graphs_of_the_compiled_module_replay_its_kernels(dynamic):
    """mode="reduce-overhead" (CUDA graphs, as transformers' generate compiles a static-cache step): every
    replay, with new values in x, gives the eager module's output bit for bit, at decoding batches (the
    binary tensor-core kernel, its launch plan, the fragment kernel) and, with static shapes, beyond them."""
    gen = torch.Generator().manual_seed(6)
    module = AnybitLinear.from_quantized(random_lut(200, 600, 0, seed=6, widths=(3, 4)),
                                         torch.randn(200, generator=gen)).cuda()
    torch._dynamo.reset()
    step = torch.compile(module, fullgraph=True, mode="reduce-overhead", dynamic=dynamic)
    for batch in (1, 1, 1, 2, 2, 2, 5, 5) + ((17, 17, 17) if not dynamic else (16, 16)):
        x = torch.randn(batch, 600, generator=gen).cuda().half()
        assert torch.equal(step(x).clone(), module(x)), batch


def test_compiled_forward_with_dynamic_shapes_equals_eager():
    module = AnybitLinear.from_quantized(random_lut(30, 64, 0, seed=7, widths=(2, 4)))
    step = torch.compile(module, fullgraph=True, backend="aot_eager", dynamic=True)
    torch._dynamo.reset()
    for batch in (2, 3, 5):
        x = torch.randn(batch, 64, generator=torch.Generator().manual_seed(batch))
        assert torch.equal(step(x), module(x)), batch
