import math

import torch
import torch.nn.functional as F

from anybit.evaluate import perplexity


def test_perplexity_matches_gptq_formula(llama):
    ids = torch.randint(0, 64, (3 * 40 + 7,), generator=torch.Generator().manual_seed(0))
    result = perplexity(llama, ids, seqlen=40, max_windows=None, batch_size=2, progress=False)
    assert result.windows == 3 and result.tokens_scored == 3 * 39
    nlls = []
    with torch.no_grad():
        for w in ids[:120].view(3, 40):
            logits = llama(w[None], use_cache=False).logits[0]
            nlls.append(F.cross_entropy(logits[:-1], w[1:]).item() * 40)
    assert math.isclose(result.ppl, math.exp(sum(nlls) / (3 * 40)), rel_tol=1e-5)


def test_max_windows_caps_tokens(llama):
    ids = torch.randint(0, 64, (400,))
    assert perplexity(llama, ids, seqlen=32, max_windows=2, progress=False).windows == 2
