"""The real SmolLM2-135M through its GGUF file, end to end on CPU (about a minute)."""

import json
import math

from anybit.cli import main
from anybit.models import resolve_model


def test_gguf_file_quantize_and_eval(tmp_path, text_file, capsys):
    folder, gguf = resolve_model("smollm2-135m")
    out = tmp_path / "sm-rtn4"
    args = ["quantize", "--model", f"{folder}/{gguf}", "--method", "rtn", "--bits", "4", "--corpus",
            f"text:{text_file}", "--nsamples", "2", "--seqlen", "64", "--eval-corpus", f"text:{text_file}",
            "--eval-windows", "2", "--quiet", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "anybit.json").read_text())
    assert report["quantized_params"] == 106_168_320  # every decoder linear of SmolLM2-135M
    # fp16 scale + zero per row: 4 + 32/576 on six linears a block, 4 + 32/1536 on down_proj
    assert abs(report["bits_per_weight"] - 4.046875) < 1e-6
    quantized = report["evaluation"][f"text:{text_file}"]["ppl"]
    capsys.readouterr()
    assert main(["eval", str(out), "--corpus", f"text:{text_file}", "--seqlen", "64", "--windows", "2",
                 "--quiet"]) == 0
    loaded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(quantized) and loaded["ppl"] == quantized  # the packed checkpoint computes the same
