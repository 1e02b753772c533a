import json
import subprocess
import sys

import pytest

from anybit.cli import main


def _quantize_args(model_dir, text_file, out, *extra):
    return ["quantize", "--model", str(model_dir), "--corpus", f"text:{text_file}", "--nsamples", "4",
            "--seqlen", "32", "--eval-corpus", f"text:{text_file}", "--eval-windows", "4", "--quiet",
            "--out", str(out), *extra]


@pytest.mark.parametrize("method,bits,extra", [("rtn", "4", []), ("gptq", "3", ["--group-size", "32"]),
                                               ("gptq", "4", ["--act-order"]), ("squeezellm", "3", [])])
def test_quantize_then_eval_end_to_end(model_dir, text_file, tmp_path, capsys, method, bits, extra):
    out = tmp_path / "out"
    assert main(_quantize_args(model_dir, text_file, out, "--method", method, "--bits", bits, *extra)) == 0
    report = json.loads((out / "anybit.json").read_text())
    assert report["method"] == method and report["bits_per_weight"] > float(bits)
    assert len(report["layers"]) == 14
    quantized_ppl = report["evaluation"][f"text:{text_file}"]["ppl"]
    capsys.readouterr()
    assert main(["eval", str(out), "--corpus", f"text:{text_file}", "--seqlen", "32", "--windows", "4",
                 "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens_scored"] == 4 * 31
    assert result["ppl"] == pytest.approx(quantized_ppl, rel=1e-2)  # weights stored in fp16


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anybit: error:"), err
    return err[0]


@pytest.mark.parametrize("args,message", [
    (["--method", "nope", "--bits", "4"], "unknown method"),
    (["--method", "gptq", "--bits", "3.5"], "whole number of bits"),
    (["--method", "rtn", "--bits", "0"], "whole number of bits"),
    (["--method", "rtn", "--bits", "4", "--group-size", "-1"], "group size"),
    (["--method", "rtn", "--bits", "4", "--device", "cuda"], "CUDA is not available"),
    (["--method", "rtn", "--bits", "4", "--corpus", "nope"], "unknown corpus"),
    (["--method", "rtn", "--bits", "4", "--seqlen", "100000"], "fewer than one window"),
])
def test_bad_inputs_give_one_line(model_dir, text_file, tmp_path, capsys, args, message):
    if "--seqlen" in args:
        argv = _quantize_args(model_dir, text_file, tmp_path / "o", *args[:-2])
        argv[argv.index("--seqlen") + 1] = args[-1]
    else:
        argv = _quantize_args(model_dir, text_file, tmp_path / "o", *args)
    assert main(argv) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_missing_model_and_nonempty_output(text_file, model_dir, tmp_path, capsys):
    assert main(_quantize_args(tmp_path / "missing", text_file, tmp_path / "o", "--method", "rtn", "--bits", "4")) == 2
    assert "not found" in _error_line(capsys)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    assert main(_quantize_args(model_dir, text_file, busy, "--method", "rtn", "--bits", "4")) == 2
    assert "not empty" in _error_line(capsys)
    assert (busy / "keep.txt").read_text() == "precious"


def test_unsupported_architecture_directory(tmp_path, text_file, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(path)
    assert main(_quantize_args(path, text_file, tmp_path / "o", "--method", "rtn", "--bits", "4")) == 2
    assert "unsupported architecture" in _error_line(capsys)


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "anybit", "eval", str(tmp_path / "nothing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("anybit: error:") and "Traceback" not in proc.stderr
