"""Every recipe end to end on a tiny random Llama, at honest budgets."""

import pytest
import torch

from anybit.errors import AnybitError
from anybit.methods import METHODS, build_method
from anybit.pipeline import quantize_model
from tests.conftest import tiny_llama

SAMPLES = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
HIDDEN = 128


@pytest.fixture(scope="module")
def reference():
    model = tiny_llama(hidden=HIDDEN)
    with torch.no_grad():
        return model(SAMPLES, use_cache=False).logits


@pytest.mark.parametrize("method,budget,options", [
    ("skim", 3.25, {"scaling_steps": 5}),
    ("skim", 3.25, {"scope": "model", "scaling": False}),
    ("skim", 3.5, {"allocator": "lagrangian", "feedback": False, "scaling_steps": 5}),
    ("slim", 3.25, {}),
    ("slim", 2.5, {"sqc": "paper"}),
    ("cmpq", 3.25, {}),
    ("claq", 3.25, {}),
])
def test_recipe_hits_honest_budget(method, budget, options, reference):
    model = tiny_llama(hidden=HIDDEN)
    result = quantize_model(model, SAMPLES, build_method(method, budget, **options), progress=False)
    assert len(result.layers) == 14
    # Group-wise widths (slim) move in steps of one group: 128 of the 128..256 columns here.
    slack = 0.55 if method == "slim" else 0.06
    assert budget - slack <= result.bits_per_weight() <= budget + 0.01
    for name, q in result.layers.items():
        assert torch.equal(dict(model.named_modules())[name].weight, q.dequantize())
    with torch.no_grad():
        err = (model(SAMPLES, use_cache=False).logits - reference).pow(2).mean()
    assert torch.isfinite(err) and err < reference.pow(2).mean()


def test_every_method_is_registered():
    assert set(METHODS) == {"rtn", "gptq", "squeezellm", "skim", "slim", "cmpq", "claq"}


@pytest.mark.parametrize("method,bits", [("skim", 1.0), ("slim", 9), ("cmpq", 0.5), ("claq", -2)])
def test_out_of_range_budgets(method, bits):
    with pytest.raises(AnybitError, match="budget"):
        build_method(method, bits)


def test_unreachable_budget_is_a_clear_error():
    model = tiny_llama(hidden=64)  # 64-column rows: a 1-bit row and its codebook cost 1.5 bits/weight
    with pytest.raises(AnybitError, match="not reachable"):
        quantize_model(model, SAMPLES, build_method("skim", 1.2, scaling=False), progress=False)
