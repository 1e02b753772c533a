"""The benchmark scripts: the decoding harness is a faithful Llama step, and each script runs end
to end on a tiny model on the CPU (the GPU runs are in BENCHMARKS.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests" / "kernels"))

import decode  # noqa: E402
import generate  # noqa: E402
import quantize_speed  # noqa: E402
import torch_forward  # noqa: E402
from interpreted import require_interpreter  # noqa: E402
import random_llama as random_llama_module  # noqa: E402
from random_llama import random_llama  # noqa: E402


def test_random_llama_has_real_shapes_and_unit_norms():
    model = random_llama("tiny", dtype=torch.float32, device="cpu")
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.shape == (64, 64) and abs(float(q.std()) - 0.02) < 0.004
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(64))
    assert model.model.rotary_emb.inv_freq.isfinite().all()


def test_static_decoder_matches_the_model_forward():
    model = random_llama("tiny", dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits[0]
    dec = decode.StaticDecoder(model, max_len=16)
    dec.reset()
    got = []
    for t in ids[0]:
        dec.token.fill_(int(t))
        got.append(dec.step()[0])
    assert torch.allclose(torch.stack(got), want, atol=1e-5, rtol=1e-4)
    assert int(dec.pos) == 12 and int(dec.token[0]) == int(want[-1].argmax())


def test_stacked_projections_give_the_plain_step():
    model = random_llama("tiny", dtype=torch.float32, device="cpu")
    for quantized in (False, True):
        if quantized:
            decode.to_anybit(model, decode.MIXES["3.25"])
        plain, stacked = decode.StaticDecoder(model, max_len=8), decode.StaticDecoder(model, max_len=8, stack=True)
        up = model.model.layers[0].mlp.up_proj
        assert stacked.gate_up[0].out_features == 2 * up.out_features
        if quantized:
            assert stacked.gate_up[0].spec.blocks[4][0] == 2 * up.spec.blocks[4][0]
        plain.reset()
        stacked.reset()
        for _ in range(3):
            assert torch.allclose(plain.step(), stacked.step(), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_steps_with_decode_attention_and_fused_planes_give_the_plain_step():
    """On a GPU, with the harness's attention kernel (fp16 and anybit) and the anybit fused step's
    norms and SiLU-and-multiply writing the linears' bit planes (``anybit.kernels.xplanes``): the
    plain step's logits (torch attention), within fp16 rounding, step after step."""
    from anybit.kernels import tiled_codes_supported

    model = random_llama("tiny", dtype=torch.float16, device="cuda")
    for quantized in (False, True):
        if quantized:
            decode.to_anybit(model, decode.MIXES["3.25"])
        plain = decode.StaticDecoder(model, max_len=8)
        fast = decode.StaticDecoder(model, max_len=8, stack=True, planes=quantized, attention="triton")
        assert not plain.planes and (not quantized or tiled_codes_supported("cuda"))
        plain.reset()
        fast.reset()
        for _ in range(5):
            want, got = plain.step().float(), fast.step().float()
            assert float((got - want).norm() / want.norm()) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_timeline_splits_a_graph_step_into_kernels_and_idle_time():
    import argparse

    model = random_llama("tiny", dtype=torch.float16, device="cuda")
    t = decode.step_timeline(model, argparse.Namespace(max_len=8, attention="triton"))
    layers = model.config.num_hidden_layers
    assert 0 < t["kernel_us"] <= t["span_us"] and t["idle_us"] >= 0
    assert sum(k["calls"] for k in t["kernels"]) == t["launches"] > 7 * layers
    # one block from one attention launch to the next: the attention kernel, then its 6 or more launches
    assert t["block"][0]["kernel"] == "_decode_attention_kernel" and len(t["block"]) >= 7
    assert any(k["kernel"] == "_decode_attention_kernel" and k["calls"] == layers for k in t["kernels"])


def test_random_anybit_linear_mixes_widths_and_counts_bits():
    gen = torch.Generator().manual_seed(0)
    m = decode.random_anybit_linear(400, 256, decode.MIXES["3.25"], "cpu", gen)
    assert m.spec.blocks == {3: (300, 256), 4: (100, 256)}
    bits = sum(t.numel() * t.element_size() * 8 for t in m.packed().values()) / (400 * 256)
    assert abs(bits - (3.25 + (0.75 * 8 * 16 + 0.25 * 16 * 16 + 8) / 256)) < 1e-9
    assert m(torch.randn(2, 256)).shape == (2, 400)


def test_decode_script_smoke(tmp_path):
    assert decode.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "anybit 4", "anybit 3.25", "anybit 2.25"]
    assert rows[1]["bits"] > rows[2]["bits"] > rows[3]["bits"]


def test_decode_script_profile_lists_each_variants_kernels(tmp_path):
    assert decode.main(["--smoke", "--budgets", "3.25", "--profile", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    for row in rows:
        kernels = row["kernels"]
        assert 0 < len(kernels) <= 15 and all(k["calls"] > 0 and k["us_per_call"] > 0 for k in kernels)
        assert [k["total_ms"] for k in kernels] == sorted((k["total_ms"] for k in kernels), reverse=True)
    assert any("linear" in k["kernel"] or "mm" in k["kernel"] for k in rows[0]["kernels"])


def test_quantize_speed_script_smoke(tmp_path):
    assert quantize_speed.main(["--smoke", "--methods", "skim:3.25", "gptq:3:32", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "quantize_speed.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["skim:3.25", "gptq:3:32"]
    skim = rows[0]["stages_s"]
    assert skim["quantize/kmeans"] > 0 and skim["quantize/allocation"] > 0 and skim["calibration_forward"] > 0
    assert abs(rows[0]["honest_bits"] - 3.25) < 0.02 and rows[0]["packed_bytes"] > 0


def test_gptq_speed_script_smoke(tmp_path):
    # its own process: --smoke runs the kernel under Triton's interpreter, which must be set before import
    require_interpreter()
    proc = subprocess.run([sys.executable, str(BENCH / "gptq_speed.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gptq_speed.json").read_text())["rows"]
    assert {(r["shape"], r["grid"]) for r in rows} == {(s, g) for s in ("40x96", "24x160") for g in ("codebook", "affine")}
    assert all(r["codes_differ"] == 0 and r["loop_layer_error"] == r["fused_layer_error"] > 0 for r in rows)


def test_generate_script_smoke(tmp_path):
    assert generate.main(["--smoke", "--budgets", "3.25", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "generate.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "anybit 3.25"]
    assert all(r[mode]["tokens_per_s"] > 0 for r in rows for mode in ("compiled", "static eager", "default"))


@pytest.mark.parametrize("layout", torch_forward.LAYOUTS)
def test_torch_forward_layouts_are_what_the_methods_write(layout):
    from anybit.nn import AnybitLinear

    q = torch_forward.random_qweight(layout, 48, 200, torch.Generator().manual_seed(0))
    assert q.kind == ("affine" if layout == "affine" else "lut")
    if layout == "affine":
        assert q.group_size == 128 and set(q.bits.tolist()) == {3}
    else:
        assert q.lut_axis == torch_forward.LAYOUTS.index(layout) and set(q.bits.tolist()) == {3, 4}
    assert q.index_bits_per_weight() == (3.0 if layout == "affine" else 3.25)
    assert (q.outliers is not None) == (layout == "cols")
    assert AnybitLinear.from_quantized(q).spec.blocks


def test_torch_forward_script_smoke(tmp_path):
    assert torch_forward.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "torch_forward.json").read_text())
    assert {r["layout"] for r in result["layers"]} == set(torch_forward.LAYOUTS)
    assert all(r["anybit_ms"] > 0 and r["unpack_ms"] > 0 and r["pack_ms"] > 0 for r in result["layers"])
    assert [r["linears"] for r in result["models"]] == ["dense fp32", *torch_forward.LAYOUTS]
    assert all(r["tokens_per_s"] > 0 and r["forward_512_ms"] > 0 for r in result["models"])


@pytest.mark.parametrize("layout", list(random_llama_module.LAYOUTS))
def test_random_weights_have_their_layout(layout):
    mix, group, axis = random_llama_module.LAYOUTS[layout]
    q = random_llama_module.random_weight(layout, 48, 300, torch.Generator().manual_seed(0))
    assert q.kind == ("lut" if group is None else "affine")
    assert (q.lut_axis == axis) if group is None else (q.group_size == group)
    widths = q.bits.tolist()
    assert set(widths) == set(mix) and abs(sum(widths) / len(widths) - sum(b * s for b, s in mix.items())) < 0.1
    assert (q.outliers is not None) == (axis == 1)


def test_grid_kernels_script_smoke(tmp_path, monkeypatch):
    import grid_kernels

    monkeypatch.setenv("ANYBIT_GRID_KERNELS", "1")  # the script turns them on; restored after
    assert grid_kernels.main(["--smoke", "--batches", "1,3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "grid_kernels.json").read_text())
    assert {r["layout"] for r in result["rows"]} == set(grid_kernels.GRID_LAYOUTS) and result["failures"] == 0
    assert all(r["kernel us"] > 0 and r["torch path us"] > 0 and r["fp16 F.linear us"] > 0 for r in result["rows"])


def test_decode_script_runs_whole_models_in_grid_layouts(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYBIT_GRID_KERNELS", "1")
    assert decode.main(["--smoke", "--budgets", "--grids", "affine-g128-3", "cols-3.25", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "anybit affine-g128-3", "anybit cols-3.25"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
