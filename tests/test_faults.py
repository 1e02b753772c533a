"""Faults injected into real runs: kill -9 at several points, damaged progress files, a full
disk; and random shapes, widths and codes thrown at the packers. Each interrupted run must leave
no output directory, and the resumed run must write exactly the bytes of an uninterrupted one."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anybit import api
from anybit.cli import main
from anybit.errors import AnybitError
from anybit.formats.bitpack import pack_bitplanes, packed_words, unpack_bitplanes
from anybit.formats.packed import LinearSpec, pack_weight, unpack_weight
from anybit.resume import MANIFEST, PLAN_FILE, block_file, progress_dir
from tests.formats.random_qweights import random_affine, random_lut, with_extras
from tests.test_resume import (
    QUICK, SKIM_MODEL_SCOPE, make_workspace, mount_tmpfs, run_interrupted, run_quantize, tree_bytes,
)
from tests.test_resume import reference, workspace  # noqa: F401 -- the fixtures: a tiny model, its gptq bytes

KILLED = -signal.SIGKILL


def cli_args(model: Path, corpus: Path, out: Path) -> list[str]:
    return ["quantize", "--model", str(model), "--method", "gptq", "--bits", "3", "--corpus", f"text:{corpus}",
            "--nsamples", str(QUICK["nsamples"]), "--seqlen", str(QUICK["seqlen"]), "--eval-corpus",
            f"text:{corpus}", "--eval-windows", str(QUICK["eval_windows"]), "--quiet", "--out", str(out)]


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; it must still be running then."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before the kill point (exit {proc.returncode}): {proc.stderr.read()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == KILLED


def saved_blocks(out: Path) -> int:
    try:
        return sum(1 for p in progress_dir(out).glob("block-*.safetensors"))
    except FileNotFoundError:  # a run that found nothing saved replaces the progress directory
        return 0


def assert_nothing_loadable(out: Path, capsys) -> None:
    """After a kill: no output directory, and neither it nor the progress passes for a model."""
    assert not out.exists()
    for folder in (out, progress_dir(out)):
        capsys.readouterr()
        assert main(["eval", str(folder), "--quiet"]) == 2
        assert capsys.readouterr().err.startswith("anybit: error:")


# A driver that dies by kill -9 after the checkpoint's files are written, before they are
# published: the one window of a run that polling from outside cannot hit.
SAVE_THEN_DIE = """
import os, signal, sys
from anybit import api
write = api.save_packed
def write_then_die(*args, **kwargs):
    write(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
api.save_packed = write_then_die
from anybit.cli import main
main(sys.argv[1:])
"""


def test_kill_9_at_several_points_then_resume(tmp_path, capsys):
    """8 blocks of gptq: killed while calibrating block 0, after 5 blocks, and while writing the
    checkpoint; each run resumes the last; the end result equals an uninterrupted run's bytes."""
    model, corpus = make_workspace(tmp_path, layers=8, hidden=128)
    assert main(cli_args(model, corpus, tmp_path / "reference")) == 0
    out = tmp_path / "out"
    args = ["-m", "anybit", *cli_args(model, corpus, out)]

    kill_when(start(*args), lambda: (progress_dir(out) / MANIFEST).exists())
    assert_nothing_loadable(out, capsys)
    kill_when(start(*args), lambda: saved_blocks(out) >= 5)
    assert_nothing_loadable(out, capsys)
    assert start("-c", SAVE_THEN_DIE, *args[2:]).wait() == KILLED
    assert_nothing_loadable(out, capsys)
    assert saved_blocks(out) == 8
    assert [p.name for p in tmp_path.glob(".out.tmp-*")], "the killed writer's temporary directory"

    assert main(cli_args(model, corpus, out)) == 0
    assert "resumed an interrupted run: 8 finished blocks restored" in capsys.readouterr().out
    assert tree_bytes(out) == tree_bytes(tmp_path / "reference")
    assert not progress_dir(out).exists() and not list(tmp_path.glob(".out.*"))


def test_kill_9_after_the_plan_keeps_the_plan(workspace, tmp_path, monkeypatch):
    model, corpus = workspace
    run_quantize(model, corpus, tmp_path / "reference", **SKIM_MODEL_SCOPE)
    out = tmp_path / "out"
    options = {**QUICK, **SKIM_MODEL_SCOPE, "corpus": f"text:{corpus}", "eval_corpus": f"text:{corpus}"}
    method, bits = options.pop("method"), options.pop("bits")
    call = f"from anybit import api; api.quantize({str(model)!r}, {method!r}, {bits!r}, out={str(out)!r}, " \
           f"**{options!r})"
    kill_when(start("-c", call), lambda: (progress_dir(out) / PLAN_FILE).exists())
    assert not out.exists()

    def no_planning(*_args):
        raise AssertionError("the plan was redone")

    monkeypatch.setattr("anybit.methods.skim.SKIM.plan", no_planning)
    run_quantize(model, corpus, out, **SKIM_MODEL_SCOPE)
    assert tree_bytes(out) == tree_bytes(tmp_path / "reference")


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


REDO_BLOCK_1 = r"delete it to redo block 1 and later ones, or pass --overwrite to start over$"


@pytest.mark.parametrize("damage,file,message,remedy", [
    (_truncate, block_file(1), rf"{block_file(1)} is damaged \(.+\): {REDO_BLOCK_1}", "delete"),
    (_flip_a_bit, block_file(1), rf"{block_file(1)} is damaged \(checksum mismatch\): {REDO_BLOCK_1}", "delete"),
    (lambda p: p.write_text("{garbage"), MANIFEST, r"progress.json is damaged \(.+\): pass --overwrite to start over$",
     "overwrite"),
    (lambda p: p.write_text('{"format": "anybit-progress", "version": 99, "fingerprint": {}}'), MANIFEST,
     "has progress format version 99, this anybit writes 1: pass --overwrite to start over$", "overwrite"),
    (lambda p: p.unlink(), MANIFEST, r"out.partial is not the progress of an anybit run \(progress.json missing\)",
     "overwrite"),
])
def test_damaged_progress_stops_with_its_name(workspace, reference, tmp_path, damage, file, message, remedy):
    out = tmp_path / "out"
    run_interrupted(2, lambda: run_quantize(*workspace, out))
    damage(progress_dir(out) / file)
    with pytest.raises(AnybitError, match=message) as caught:
        run_quantize(*workspace, out)
    assert "\n" not in str(caught.value)
    if remedy == "delete":
        (progress_dir(out) / file).unlink()
        assert run_quantize(*workspace, out)["resumed_blocks"] == 1
    else:
        assert run_quantize(*workspace, out, overwrite=True)["resumed_blocks"] == 0
    assert tree_bytes(out) == reference


def test_damaged_plan_stops_and_deleting_it_redoes_the_plan(workspace, tmp_path):
    skim = SKIM_MODEL_SCOPE
    out = tmp_path / "out"
    run_interrupted(1, lambda: run_quantize(*workspace, out, **skim))
    plan = progress_dir(out) / PLAN_FILE
    plan.write_bytes(b"\x80garbage")
    with pytest.raises(AnybitError, match=r"plan.pt is damaged \(.*\): delete it to redo the planning pass"):
        run_quantize(*workspace, out, **skim)
    plan.unlink()
    run_quantize(*workspace, out, **skim)
    run_quantize(*workspace, tmp_path / "reference", **skim)
    assert tree_bytes(out) == tree_bytes(tmp_path / "reference")


def test_half_written_progress_file_is_ignored(workspace, reference, tmp_path):
    """A kill during a block's write leaves only a temporary: the block counts as not done."""
    out = tmp_path / "out"
    run_interrupted(2, lambda: run_quantize(*workspace, out))
    (progress_dir(out) / f".{block_file(2)}.tmp-999999-x").write_bytes(b"half a block")
    assert run_quantize(*workspace, out)["resumed_blocks"] == 2
    assert tree_bytes(out) == reference


def test_disk_full_while_publishing_keeps_the_progress(workspace, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(api, "save_packed", no_space)
        with pytest.raises(AnybitError, match=f"^cannot write {out}: No space left on device$"):
            run_quantize(*workspace, out)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    assert run_quantize(*workspace, out)["resumed_blocks"] == 4
    assert tree_bytes(out) == reference


def test_disk_full_on_a_real_filesystem_then_resume(workspace, reference, tmp_path):
    """A 96 KiB tmpfs fills up after two blocks' progress; once it is grown the run resumes."""
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "96k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "out"
        with pytest.raises(AnybitError, match=r"cannot write .*out\.partial/block-\d+\.safetensors: "
                                              r"No space left on device$"):
            run_quantize(*workspace, out)
        done = saved_blocks(out)
        assert not out.exists() and done >= 1
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        assert run_quantize(*workspace, out)["resumed_blocks"] == done
        assert tree_bytes(out) == reference
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# -- random inputs to the packers -------------------------------------------------------------------

FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(rows=st.integers(1, 6), cols=st.integers(1, 200), bits=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_bitplanes_round_trip_any_shape(rows, cols, bits, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
    words = pack_bitplanes(codes, bits)
    assert words.dtype == torch.int32 and tuple(words.shape) == (rows, packed_words(cols, bits))
    assert torch.equal(unpack_bitplanes(words, bits, cols), codes)


@FAST
@given(kind=st.sampled_from(["lut-rows", "lut-cols", "affine"]), out=st.integers(1, 40), inn=st.integers(1, 70),
       group=st.integers(0, 40), low=st.integers(1, 8), span=st.integers(0, 7), extras=st.booleans(),
       seed=st.integers(0, 2**16))
def test_packed_weights_round_trip_any_layout(kind, out, inn, group, low, span, extras, seed):
    widths = (low, min(8, low + span))
    if kind == "affine":
        q = random_affine(out, inn, group, seed, widths)
    else:
        q = random_lut(out, inn, int(kind == "lut-cols"), seed, widths)
    if extras:
        q = with_extras(q, seed, outliers=min(5, q.numel))
    spec, tensors = pack_weight(q)
    assert LinearSpec.from_json(spec.to_json(), "spec") == spec
    assert {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()} == spec.tensor_specs()
    assert sum(t.numel() * t.element_size() * 8 for t in tensors.values()) == q.total_bits()
    back = unpack_weight(spec, tensors)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.bits, q.bits.int())
    assert torch.equal(back.dequantize(), q.dequantize())
