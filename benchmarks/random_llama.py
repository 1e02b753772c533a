"""Llama models in real shapes with random weights, random packed codebook blocks, and random quantized
weights in the layouts the methods write (``LAYOUTS``), for speed work (no download, no checkpoint).

``random_llama("llama2-7b")`` builds ``LlamaForCausalLM`` from a config with its parameters
materialised straight on ``device`` in ``dtype``: N(0, 0.02) linears and embeddings, unit
norms. Weights are drawn on ``fill_device`` (a GPU draws 6.7 B numbers in about a second; the
CPU's default init of a 7B model takes minutes) and copied over.
"""

from __future__ import annotations

import torch

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_theta=500000.0),
    # SmolLM2-135M-Instruct (anybit's demo model), untied head: the same work a token
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=256),
}


def llama_config(shape: str, layers: int | None = None):
    from transformers import LlamaConfig

    kwargs = dict(SHAPES[shape])
    if layers:
        kwargs["num_hidden_layers"] = layers
    return LlamaConfig(**kwargs, tie_word_embeddings=False)


@torch.no_grad()
def random_llama(shape: str = "llama2-7b", layers: int | None = None, dtype=torch.float16, device="cpu",
                 fill_device=None, seed: int = 0):
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    config = llama_config(shape, layers)
    with init_empty_weights():  # parameters on meta; buffers (rotary inv_freq) real
        model = LlamaForCausalLM(config)
    fill_device = torch.device(fill_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(fill_device).manual_seed(seed)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if name == "weight" and p.dim() == 1:  # RMSNorm
                value = torch.ones(p.shape, dtype=dtype, device=device)
            else:
                value = torch.empty(p.shape, dtype=dtype, device=device)
                for r0 in range(0, p.shape[0], 4096):  # bounded scratch on the fill device
                    rows = min(4096, p.shape[0] - r0)
                    part = torch.randn((rows, *p.shape[1:]), generator=gen, device=fill_device) * 0.02
                    value[r0:r0 + rows].copy_(part.to(dtype))
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    model.to(device)  # buffers
    model.config.torch_dtype = dtype
    return model.eval()


# The width budgets of the speed benchmarks as row shares per width: 3.25 bits = 75% 3-bit + 25% 4-bit rows
MIXES = {"4": {4: 1.0}, "3.25": {3: 0.75, 4: 0.25}, "2.25": {2: 0.75, 3: 0.25}, "3": {3: 1.0}, "2": {2: 1.0}}


def mix_of(width: str) -> dict[int, float]:
    """Row shares per width of a width name ("3.25": ``MIXES``; "5": all rows 5-bit)."""
    return MIXES[width] if width in MIXES else {int(width): 1.0}


def random_row_widths(rows: int, mix: dict[int, float], gen: torch.Generator) -> torch.Tensor:
    """uint8 (rows,): each row's width, the wider widths of ``mix`` on random rows by their shares
    (the narrowest takes the rest)."""
    widths = torch.full((rows,), min(mix), dtype=torch.uint8)
    rest = torch.randperm(rows, generator=gen)
    start = 0
    for bits, share in sorted(mix.items())[1:]:
        n = round(share * rows)
        widths[rest[start:start + n]] = bits
        start += n
    return widths


def random_lut_block(rows: int, cols: int, bits: int, device, lut_dtype=torch.float16, gen=None):
    """Random bit-plane packed codes (rows x cols at ``bits``) and sorted random per-row codebooks
    (fp16 values; ``lut_dtype`` fp32 gives an upcast copy). For whole chunks of 32 columns
    uniformly random words are uniformly random codes; other column counts go through
    ``pack_bitplanes`` (codes drawn from ``gen``)."""
    if cols % 32 == 0:
        packed = torch.randint(-2**31, 2**31, (rows, cols // 32 * bits), dtype=torch.int32, device=device)
    else:
        from anybit.formats.bitpack import pack_bitplanes

        codes = torch.randint(0, 2**bits, (rows, cols), generator=gen)
        packed = pack_bitplanes(codes, bits).to(device)
    lut = (torch.randn(rows, 2**bits, device=device).sort(dim=1).values * 0.02).half()
    return packed, lut.to(lut_dtype)


# Layouts as the methods write them: (share of units by width, affine group size or None for codebooks, axis of
# the codebooks). rows-3.25: per-row codebooks, 75% 3-bit and 25% 4-bit rows (skim, squeezellm at 3.25 bits);
# cols-3.25: per-column codebooks, 75% 3-bit and 25% 4-bit columns, OUTLIER_SHARE fp16 outliers (cmpq, claq);
# affine-g128-3 / -3.25: 3-bit groups of 128 columns (gptq, rtn --group-size 128) / 25% of them 4-bit (slim);
# affine-row-4: one 4-bit grid a row (gptq, rtn's default group size 0).
LAYOUTS = {"rows-3.25": (MIXES["3.25"], None, 0), "cols-3.25": (MIXES["3.25"], None, 1),
           "affine-g128-3": (MIXES["3"], 128, None), "affine-g128-3.25": (MIXES["3.25"], 128, None),
           "affine-row-4": (MIXES["4"], 0, None)}
OUTLIER_SHARE = 0.005


def random_weight(layout: str, out_f: int, in_f: int, gen: torch.Generator):
    """A ``QuantizedWeight`` of ``LAYOUTS[layout]``: random codes, sorted random codebooks, scales, zeros in the
    middle of the grid, outliers (values do not change the speed)."""
    from anybit.quant.qweight import Outliers, QuantizedWeight

    mix, group, axis = LAYOUTS[layout]
    if group is None:  # codebooks, per row (axis 0) or per column (axis 1)
        widths = random_row_widths(out_f if axis == 0 else in_f, mix, gen).int()
        limits = (2 ** widths.long()).view(-1, 1) if axis == 0 else (2 ** widths.long()).view(1, -1)
        codes = (torch.randint(0, 256, (out_f, in_f), generator=gen) % limits).to(torch.uint8)
        lut = (torch.randn(widths.numel(), 2 ** max(mix), generator=gen).sort(1).values * 0.02).half()
        q = QuantizedWeight(out_f, in_f, codes, widths, lut=lut, lut_axis=axis)
        if axis == 1:
            n = round(OUTLIER_SHARE * out_f * in_f)
            positions = torch.randperm(out_f * in_f, generator=gen)[:n].sort().values
            q.outliers = Outliers(positions, (torch.randn(n, generator=gen) * 0.1).half())
        return q
    groups = -(-in_f // group) if group else 1
    widths = random_row_widths(groups, mix, gen).int()
    column_widths = widths.repeat_interleave(group or in_f)[:in_f]
    codes = (torch.randint(0, 256, (out_f, in_f), generator=gen) % (2 ** column_widths.long())).to(torch.uint8)
    scales = (torch.rand(out_f, groups, generator=gen) * 0.01 + 0.001).half()
    zeros = (2 ** (widths.long() - 1)).expand(out_f, groups).half()
    return QuantizedWeight(out_f, in_f, codes, widths, scales=scales, zeros=zeros, group_size=group)
