"""Why anybit's RTN g128 rows beat shared/protocol.md's reference: the group layout.

anybit groups 128 consecutive *columns* of each row (the last group of a 576-column row has
64), as GPTQ does. The reference's honest-bits column (exactly 4.25 / 3.25) fits groups of 128
consecutive weights of the *flattened* matrix, which straddle rows. This script quantizes that
way with anybit's own min-max grid and scores it under the protocol:

    python benchmarks/rtn_reference_layout.py
"""

from __future__ import annotations

import copy

from anybit.data import Corpus
from anybit.evaluate import perplexity
from anybit.models import block_linears, decoder_blocks, load_model
from anybit.quant.uniform import dequantize_affine, minmax_params, quantize_affine

REFERENCE = {3: 178.759, 4: 56.143}


def main() -> None:
    model, tokenizer = load_model("smollm2-135m", progress=False)
    ids = Corpus("shakespeare-heldout").evaluation(tokenizer, 512)
    for bits in (3, 4):
        quantized = copy.deepcopy(model)
        for block in decoder_blocks(quantized):
            for linear in block_linears(block).values():
                flat = linear.weight.data.reshape(-1, 128)
                scale, zero = minmax_params(flat, bits)
                deq = dequantize_affine(quantize_affine(flat, scale, zero, bits), scale, zero)
                linear.weight.data = deq.reshape(linear.weight.shape)
        ppl = perplexity(quantized, ids, progress=False).ppl
        print(f"rtn {bits}-bit, flattened groups of 128: ppl {ppl:.3f} "
              f"(reference {REFERENCE[bits]}, {100 * (ppl / REFERENCE[bits] - 1):+.2f}%)")


if __name__ == "__main__":
    main()
