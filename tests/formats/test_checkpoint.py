"""Packed checkpoints end to end on tiny random Llamas: round trip, size, registration, damage."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import anybit
from anybit import api
from anybit.cli import main
from anybit.errors import AnybitError
from anybit.formats.checkpoint import WEIGHTS_FILE, inspect, packed_bytes, read_specs
from anybit.methods import build_method
from anybit.models import block_linears, check_supported, decoder_blocks
from anybit.nn import AnybitLinear
from anybit.pipeline import QuantizationResult, quantize_model
from tests.conftest import char_tokenizer, tiny_llama
from tests.formats.random_qweights import random_affine, random_lut, with_extras

IDS = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _save(model, result, out, method="test"):
    api.save(model, char_tokenizer(), result, {"method": method, "settings": {}}, out, overwrite=False)


def _quantized_checkpoint(out, method, bits, **options):
    """Quantize a tiny Llama in memory; save it packed; return the in-memory model's logits and result."""
    model = tiny_llama(layers=1)
    samples = torch.randint(3, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    result = quantize_model(model, samples, build_method(method, bits, **options), progress=False)
    expected = _logits(model)
    _save(model, result, out, method)
    return expected, result


def _mixed_checkpoint(out, bias=False):
    """A tiny Llama whose linears carry hand-built mixed-width weights of every layout and extra."""
    config = tiny_llama().config
    config.attention_bias = config.mlp_bias = bias
    torch.manual_seed(0)
    model = type(tiny_llama())(config).eval()
    makers = [lambda o, i, s: with_extras(random_lut(o, i, 0, s), s), lambda o, i, s: with_extras(random_lut(o, i, 1, s), s),
              lambda o, i, s: with_extras(random_affine(o, i, 32, s), s), lambda o, i, s: random_affine(o, i, 0, s)]
    result = QuantizationResult()
    for b, block in enumerate(decoder_blocks(model)):
        for k, (name, linear) in enumerate(block_linears(block).items()):
            q = makers[k % len(makers)](linear.out_features, linear.in_features, 10 * b + k)
            # keep activations tame: mixed random codebooks are far larger than trained weights
            q = _scaled(q, 0.05)
            linear.weight.data = q.dequantize()
            result.layers[f"model.layers.{b}.{name}"] = q
    expected = _logits(model)
    _save(model, result, out)
    return expected, result


def _scaled(q, factor):
    for name in ("lut", "scales"):
        if getattr(q, name) is not None:
            setattr(q, name, (getattr(q, name).float() * factor).half())
    if q.outliers is not None:
        q.outliers.values = (q.outliers.values.float() * factor).half()
    return q


ROUND_TRIPS = {
    "rtn-4-channel": ("rtn", 4, {}),
    "rtn-3-g32": ("rtn", 3, {"group_size": 32}),
    "gptq-3-g32": ("gptq", 3, {"group_size": 32}),
    "gptq-4-act-order": ("gptq", 4, {"act_order": True}),
    "gptq-3-act-order-g32": ("gptq", 3, {"group_size": 32, "act_order": True}),
    "squeezellm-3": ("squeezellm", 3, {}),
}


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_round_trip_logits_and_size(tmp_path, case):
    method, bits, options = ROUND_TRIPS[case]
    expected, result = _quantized_checkpoint(tmp_path / "ckpt", method, bits, **options)
    model, _ = anybit.load(tmp_path / "ckpt")
    assert (_logits(model) - expected).abs().max() <= 1e-4
    _assert_honest_size(tmp_path / "ckpt", model, result)


@pytest.mark.parametrize("bias", [False, True])
def test_mixed_widths_and_every_extra_round_trip(tmp_path, bias):
    expected, result = _mixed_checkpoint(tmp_path / "ckpt", bias)
    model, _ = anybit.load(tmp_path / "ckpt")
    assert (_logits(model) - expected).abs().max() <= 1e-4
    _assert_honest_size(tmp_path / "ckpt", model, result)
    assert {m.spec.grid + str(m.spec.lut_axis) for m in model.modules() if isinstance(m, AnybitLinear)} == \
        {"lut0", "lut1", "affine0"}


def _assert_honest_size(folder, model, result):
    honest_bytes = result.bits_per_weight() * result.numel() / 8
    on_disk = inspect(folder)["packed_bytes"]
    assert on_disk == result.total_bits() / 8  # every stored bit is in the accounting, and no more
    assert abs(on_disk - honest_bytes) <= 0.02 * honest_bytes
    assert packed_bytes(model) == on_disk


def test_transformers_loads_anybit_modules_with_packed_buffers(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert "anybit" in AUTO_QUANTIZER_MAPPING and "anybit" in AUTO_QUANTIZATION_CONFIG_MAPPING
    expected, _ = _quantized_checkpoint(tmp_path / "ckpt", "rtn", 4, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    check_supported(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, AnybitLinear)
    assert q_proj.codes_4bit.dtype == torch.int32 and q_proj.scales_4bit.dtype == torch.float16
    assert not [n for n, _ in q_proj.named_parameters()]  # packed tensors are buffers
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    assert model.config.quantization_config.quant_method == "anybit"
    assert (_logits(model) - expected).abs().max() <= 1e-4
    model.save_pretrained(tmp_path / "again")  # a loaded packed model saves packed again
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    assert (_logits(again) - expected).abs().max() <= 1e-4


def test_generate_compiles_the_decoding_steps_of_a_loaded_checkpoint(tmp_path):
    """transformers' generate with a static cache compiles a loaded anybit model's decoding steps (on a GPU by
    itself; here asked to, with fullgraph so that any graph break fails) and picks the eager model's tokens."""
    from transformers import AutoModelForCausalLM
    from transformers.generation import CompileConfig

    _quantized_checkpoint(tmp_path / "ckpt", "squeezellm", 3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert model.hf_quantizer.is_compileable
    config = CompileConfig(fullgraph=True, backend="aot_eager")
    config._compile_all_devices = True
    prompt = IDS[:1, :5]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="static",
                  pad_token_id=0)
    torch._dynamo.reset()
    compiled = model.generate(prompt, compile_config=config, **kwargs)
    assert hasattr(model, "_compiled_call")  # the steps did run compiled
    assert torch.equal(compiled, model.generate(prompt, disable_compile=True, **kwargs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_generate_compiles_a_loaded_checkpoint_into_cuda_graphs(tmp_path):
    """On a GPU generate compiles a static-cache step by itself (inductor, CUDA graphs) around the anybit kernels:
    each compiled step's logits as the eager step's (fp16 glue rounds otherwise when compiled), to the tokens."""
    from transformers import AutoModelForCausalLM

    _quantized_checkpoint(tmp_path / "ckpt", "squeezellm", 3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float16).cuda()
    prompt = IDS[:1, :5].cuda()
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="static",
                  pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    torch._dynamo.reset()
    compiled = model.generate(prompt, **kwargs)
    assert hasattr(model, "_compiled_call")
    eager = model.generate(prompt, disable_compile=True, **kwargs)
    agree = int((compiled.sequences == eager.sequences).long().cumprod(1).sum()) - prompt.shape[1]
    assert agree >= 2, (compiled.sequences, eager.sequences)
    for step in range(agree):
        a, b = compiled.logits[step].float(), eager.logits[step].float()
        assert float((a - b).norm() / b.norm()) < 1e-2, step


def test_a_model_loaded_from_gguf_saves(tmp_path):
    """transformers' gguf quantizer refuses to save; the weights it left are plain, so saving drops it."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    model = tiny_llama()
    model.hf_quantizer = GgufHfQuantizer(GgufConfig(gguf_file="model.gguf"))
    model.config.quantization_config = model.hf_quantizer.quantization_config
    samples = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    _save(model, quantize_model(model, samples, build_method("rtn", 4), progress=False), tmp_path / "ckpt")
    assert read_specs(tmp_path / "ckpt")


def test_config_records_format_modules_and_unquantized(tmp_path):
    _quantized_checkpoint(tmp_path / "ckpt", "rtn", 4)
    qconfig = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "anybit" and qconfig["format_version"] == 1 and qconfig["method"] == "rtn"
    assert len(qconfig["modules"]) == 7 and qconfig["unquantized_modules"] == ["lm_head"]
    assert qconfig["modules"]["model.layers.0.mlp.down_proj"]["blocks"] == {"4": [64, 128]}


# -- damaged checkpoints ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "ckpt"
    _mixed_checkpoint(folder)
    return folder


def _edit_tensors(folder, edit):
    tensors = load_file(folder / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})


def _edit_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


Q = "model.layers.0.self_attn.q_proj"  # lut rows, mixed widths, perm, input_scale, outliers
DAMAGE = {
    "missing packed tensor": (lambda f: _edit_tensors(f, lambda t: t.pop(f"{Q}.lut_3bit")),
                              f"tensor {Q}.lut_3bit is missing"),
    "missing plain tensor": (lambda f: _edit_tensors(f, lambda t: t.pop("model.norm.weight")),
                             "tensor model.norm.weight is missing"),
    "wrong shape": (lambda f: _edit_tensors(f, lambda t: t.update({f"{Q}.perm": t[f"{Q}.perm"][:-1].clone()})),
                    rf"tensor {Q}.perm has shape \[63\], expected \[64\]"),
    "wrong plain shape": (lambda f: _edit_tensors(f, lambda t: t.update({"model.norm.weight": torch.ones(3)})),
                          r"tensor model.norm.weight has shape \[3\], expected \[64\]"),
    "wrong dtype": (lambda f: _edit_tensors(f, lambda t: t.update({f"{Q}.codes_3bit": t[f"{Q}.codes_3bit"].long()})),
                    f"tensor {Q}.codes_3bit has dtype I64, expected I32"),
    "widths disagree": (lambda f: _edit_tensors(f, lambda t: t[f"{Q}.widths"][:1].apply_(lambda w: w % 8 + 1)),
                        f"{Q}.widths does not match"),
    "perm not a permutation": (lambda f: _edit_tensors(f, lambda t: t[f"{Q}.perm"].zero_()),
                               f"{Q}.perm is not a permutation"),
    "unknown format version": (lambda f: _edit_config(f, lambda c: c["quantization_config"].update(format_version=7)),
                               "quantization_config.format_version is 7"),
    "bad module field": (lambda f: _edit_config(f, lambda c: c["quantization_config"]["modules"][Q].update(grid="vq")),
                         rf"modules\['{Q}'\]: grid 'vq'"),
    "module not in model": (lambda f: _edit_config(f, lambda c: c["quantization_config"]["modules"].update(
        {"model.layers.9.mlp.up_proj": c["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]})),
        "modules names model.layers.9.mlp.up_proj"),
    "truncated weights": (lambda f: _truncate(f / WEIGHTS_FILE), "model.safetensors is damaged or truncated"),
    "corrupted json": (lambda f: (f / "config.json").write_text('{"model_type": "llama", '),
                       "config.json is not valid JSON"),
}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _damaged(good_checkpoint, tmp_path, case):
    folder = tmp_path / "damaged"
    shutil.copytree(good_checkpoint, folder)
    DAMAGE[case][0](folder)
    return folder


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_checkpoint_fails_at_load_with_one_clear_error(good_checkpoint, tmp_path, case):
    folder = _damaged(good_checkpoint, tmp_path, case)
    with pytest.raises(AnybitError, match=DAMAGE[case][1]):
        anybit.load(folder)


@pytest.mark.parametrize("case", ["missing packed tensor", "unknown format version", "truncated weights"])
def test_damaged_checkpoint_through_transformers_and_cli(good_checkpoint, tmp_path, capsys, text_file, case):
    from transformers import AutoModelForCausalLM

    folder = _damaged(good_checkpoint, tmp_path, case)
    with pytest.raises(AnybitError, match=DAMAGE[case][1]):
        AutoModelForCausalLM.from_pretrained(folder)
    for argv in (["inspect", str(folder)],
                 ["eval", str(folder), "--corpus", f"text:{text_file}", "--seqlen", "16", "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("anybit: error:") and "Traceback" not in err[0]


# -- CLI ----------------------------------------------------------------------------------------

def test_inspect_prints_widths_bits_and_sizes(good_checkpoint, capsys):
    assert main(["inspect", str(good_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert f"{Q} " in out and "rows" in out and "columns" in out and "groups" in out and "fp16" in out
    assert out.strip().splitlines()[-1].startswith("total: 73728 quantized weights")  # 2 x 36864
    info = inspect(good_checkpoint)
    layer = info["layers"][Q]
    assert layer["fp16_bytes"] == 64 * 64 * 2 and sum(layer["widths"].values()) == 64
    assert len(read_specs(good_checkpoint)) == 14


def test_eval_on_packed_checkpoint_matches_quantize_report(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--seqlen", "32", "--quiet"]
    assert main(["quantize", "--model", str(model_dir), "--method", "gptq", "--bits", "3", "--group-size", "32",
                 "--corpus", f"text:{text_file}", "--nsamples", "4", "--eval-corpus", f"text:{text_file}",
                 "--eval-windows", "4", "--out", str(out), *common]) == 0
    report = json.loads((out / "anybit.json").read_text())
    assert report["format"]["name"] == "anybit-packed"
    capsys.readouterr()
    assert main(["eval", str(out), "--corpus", f"text:{text_file}", "--windows", "4", *common]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ppl"] == pytest.approx(report["evaluation"][f"text:{text_file}"]["ppl"], rel=1e-5)


def test_eval_tasks_without_lm_eval_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # as if not installed
    assert main(["eval", str(tmp_path), "--tasks", "piqa,arc_easy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["anybit: error: --tasks needs lm-evaluation-harness, which is not installed: "
                   "pip install 'anybit[eval]' (or pip install lm_eval)"]


def test_eval_tasks_runs_lm_eval_on_the_loaded_model(good_checkpoint, capsys, monkeypatch):
    """The bridge's plumbing with a stand-in lm_eval: HFLM gets the packed model, tasks pass through."""
    import sys
    import types

    seen = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size, device):
            seen.update(model=pretrained, device=device)

    def simple_evaluate(model, tasks, limit):
        seen.update(tasks=tasks, limit=limit)
        return {"results": {t: {"acc,none": 0.5} for t in tasks}}

    harness = types.ModuleType("lm_eval")
    harness.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", harness)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)
    assert main(["eval", str(good_checkpoint), "--tasks", "piqa,arc_easy", "--limit", "5", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tasks"] == {"piqa": {"acc,none": 0.5}, "arc_easy": {"acc,none": 0.5}}
    assert seen["tasks"] == ["piqa", "arc_easy"] and seen["limit"] == 5 and seen["device"] == "cpu"
    assert isinstance(seen["model"].model.layers[0].self_attn.q_proj, AnybitLinear)


def test_dequantized_format_is_still_available(model_dir, text_file, tmp_path):
    out = tmp_path / "fp16"
    assert main(["quantize", "--model", str(model_dir), "--method", "rtn", "--bits", "4", "--corpus",
                 f"text:{text_file}", "--nsamples", "2", "--seqlen", "32", "--eval-corpus", "none", "--quiet",
                 "--format", "dequantized", "--out", str(out)]) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "anybit.json").read_text())["format"]["name"] == "anybit-dequantized"
