"""Resumable runs (anybit.resume): block files, fingerprints, the progress directory, and the
pipeline hooks. An interruption here is an exception raised in-process right after a block is
saved; tests/test_faults.py kills real subprocesses. The helpers at the top are shared with it."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from unittest import mock

import pytest
import torch

from anybit import api, pipeline
from anybit.errors import AnybitError
from anybit.fileio import atomic_directory, write_json_atomic
from anybit.resume import (
    LOCK_FILE, MANIFEST, PLAN_FILE, RunProgress, block_file, first_difference, progress_dir, read_block, write_block,
)
from tests.conftest import char_tokenizer, tiny_llama, tiny_text
from tests.formats.random_qweights import all_kinds

QUICK = {"nsamples": 8, "seqlen": 64, "eval_windows": 2, "progress": False}
SKIM_MODEL_SCOPE = {"method": "skim", "bits": 3.0, "scope": "model", "scaling": False, "feedback": False}  # planned


def make_workspace(root: Path, layers: int = 4, hidden: int = 64) -> tuple[Path, Path]:
    """A tiny Llama directory and a text corpus under ``root``."""
    model = root / f"llama-{layers}x{hidden}"
    tiny_llama(layers=layers, hidden=hidden).save_pretrained(model)
    char_tokenizer().save_pretrained(model)
    corpus = root / "corpus.txt"
    corpus.write_text(tiny_text(), encoding="utf-8")
    return model, corpus


def run_quantize(model: Path, corpus: Path, out: Path, method: str = "gptq", bits: float = 3, **options) -> dict:
    return api.quantize(str(model), method, bits, out=out, corpus=f"text:{corpus}", eval_corpus=f"text:{corpus}",
                        **{**QUICK, **options})


def mount_tmpfs(folder: Path, size: str) -> bool:
    """A small real filesystem to fill up; False where mounting is not allowed (not root)."""
    folder.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path: what 'byte-identical' compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Interrupted(Exception):
    """Stands in for a crash right after a block's progress file is written."""


def run_interrupted(blocks: int, run) -> None:
    """Call ``run()``, stopping it right after its ``blocks``-th block is saved."""
    save = RunProgress.save_block

    def save_then_stop(self, b, layers):
        save(self, b, layers)
        if b + 1 == blocks:
            raise Interrupted

    with mock.patch.object(RunProgress, "save_block", save_then_stop):
        try:
            run()
        except Interrupted:
            return
    raise AssertionError(f"the run finished before block {blocks}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory):
    """An uninterrupted gptq run's files."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_quantize(*workspace, out)
    return tree_bytes(out)


# -- block files ----------------------------------------------------------------------------------

def test_block_file_keeps_every_field_exactly(tmp_path):
    layers = all_kinds()
    for q in layers.values():
        q.meta.update(lfull=1.5, scaling="kept", dropped=torch.ones(1))
    rng = torch.get_rng_state()
    write_block(tmp_path / "b.safetensors", layers, rng)
    shapes = {name: (q.out_features, q.in_features) for name, q in layers.items()}
    back, back_rng = read_block(tmp_path / "b.safetensors", shapes)
    assert torch.equal(back_rng, rng)
    for name, q in layers.items():
        for f in fields(q):
            a, b = getattr(q, f.name), getattr(back[name], f.name)
            if isinstance(a, torch.Tensor):
                assert a.dtype == b.dtype and torch.equal(a, b), (name, f.name)
            elif f.name == "outliers" and a is not None:
                assert torch.equal(a.positions, b.positions) and torch.equal(a.values, b.values)
            elif f.name == "meta":
                assert b == {"lfull": 1.5, "scaling": "kept"}  # only plain values persist
            else:
                assert a == b, (name, f.name)


def test_block_file_damage_is_detected(tmp_path):
    layers = {"x": all_kinds()["lut-rows"]}
    path = tmp_path / "b.safetensors"
    write_block(path, layers, torch.get_rng_state())
    shapes = {"x": (37, 45)}
    with pytest.raises(ValueError, match="other layers"):
        read_block(path, {"y": (37, 45)})
    with pytest.raises(ValueError, match="37x45"):
        read_block(path, {"x": (45, 37)})
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # one flipped bit in a tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        read_block(path, shapes)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError):
        read_block(path, shapes)


def test_first_difference_names_the_field():
    old = {"model": "m", "model_files": [["a", 1, 2]], "settings": {"bits": 3.0, "group_size": 0},
           "calibration_tokens": "abc"}
    assert first_difference(old, dict(old)) is None
    assert first_difference(old, {**old, "settings": {"bits": 4.0, "group_size": 0}}) == \
        "a different settings.bits (3.0 then, 4.0 now)"
    assert first_difference(old, {**old, "model_files": [["a", 1, 3]]}).startswith("different model files")
    assert first_difference(old, {**old, "calibration_tokens": "abd"}).startswith("different calibration tokens")
    assert first_difference(old, {**old, "device": "cuda"}) == "a different device (null then, \"cuda\" now)"


# -- whole runs -----------------------------------------------------------------------------------

def test_same_seed_gives_the_same_bytes(workspace, reference, tmp_path):
    run_quantize(*workspace, tmp_path / "again")
    assert tree_bytes(tmp_path / "again") == reference
    assert not progress_dir(tmp_path / "again").exists()  # removed once the output is published


def test_interrupted_run_resumes_to_identical_bytes(workspace, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_interrupted(2, lambda: run_quantize(*workspace, out))
    assert not out.exists()
    assert sorted(p.name for p in progress_dir(out).iterdir()) == [block_file(0), block_file(1), LOCK_FILE, MANIFEST]
    calibrated, collect_stats = [], pipeline.collect_stats

    def counting(*args, **kwargs):
        calibrated.append(1)
        return collect_stats(*args, **kwargs)

    monkeypatch.setattr(pipeline, "collect_stats", counting)
    report = run_quantize(*workspace, out)
    assert report["resumed_blocks"] == 2
    assert len(calibrated) == 2 * 4  # two blocks left, four groups of linears each
    assert tree_bytes(out) == reference
    assert not progress_dir(out).exists()


def test_planned_method_keeps_its_plan(workspace, tmp_path, monkeypatch):
    """SKIM with one budget over the model plans every layer first; a resume restores the plan."""
    skim = SKIM_MODEL_SCOPE
    run_quantize(*workspace, tmp_path / "ref", **skim)
    run_interrupted(1, lambda: run_quantize(*workspace, tmp_path / "out", **skim))
    assert (progress_dir(tmp_path / "out") / PLAN_FILE).is_file()

    def no_planning(*_args):
        raise AssertionError("the plan was redone")

    monkeypatch.setattr("anybit.methods.skim.SKIM.plan", no_planning)
    assert run_quantize(*workspace, tmp_path / "out", **skim)["resumed_blocks"] == 1
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "ref")


def test_changed_command_is_refused_and_overwrite_starts_over(workspace, reference, tmp_path):
    out = tmp_path / "out"
    run_interrupted(1, lambda: run_quantize(*workspace, out))
    with pytest.raises(AnybitError, match=r"holds an interrupted run with a different settings.bits "
                                          r"\(3 then, 4 now\).*--overwrite"):
        run_quantize(*workspace, out, bits=4)
    with pytest.raises(AnybitError, match="a different calibration.seed"):
        run_quantize(*workspace, out, seed=1)
    with pytest.raises(AnybitError, match="a different method"):
        run_quantize(*workspace, out, method="rtn")
    assert run_quantize(*workspace, out, overwrite=True)["resumed_blocks"] == 0
    assert tree_bytes(out) == reference


def test_second_writer_is_locked_out(tmp_path):
    first = RunProgress.open(tmp_path / "out", {"run": 1})
    try:
        with pytest.raises(AnybitError, match="another anybit run is writing"):
            RunProgress.open(tmp_path / "out", {"run": 1})
    finally:
        first.close()
    RunProgress.open(tmp_path / "out", {"run": 1}).close()  # free again once the first is closed


def test_killed_writers_temporaries_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".out.tmp-{dead.pid}-abc").mkdir()
    (tmp_path / f".out.tmp-{os.getpid()}-def").mkdir()  # ours: a writer still alive
    (tmp_path / ".other.tmp-1-x").mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert {p.name for p in tmp_path.iterdir()} == {f".out.tmp-{os.getpid()}-def", ".other.tmp-1-x", "out"}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_published_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            write_json_atomic(tmp / "report.json", {"a": 1})
            fd = os.open(tmp / "sub" / "private", os.O_CREAT | os.O_WRONLY, 0o600)  # as transformers writes
            os.close(fd)
    finally:
        os.umask(old)
    published = [tmp_path / "out", *(tmp_path / "out").rglob("*")]
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in published}
    assert modes == {"out": 0o777 & ~umask, "out/sub": 0o777 & ~umask,
                     "out/report.json": 0o666 & ~umask, "out/sub/private": 0o666 & ~umask}


def test_lock_is_released_by_a_dead_process(tmp_path):
    """flock dies with its process: a kill -9 never leaves the progress locked."""
    folder = RunProgress.open(tmp_path / "out", {"run": 1})
    folder.close()
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print(flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(progress_dir(tmp_path / "out") / LOCK_FILE)],
                              stdout=subprocess.PIPE)
    holder.stdout.readline()
    with pytest.raises(AnybitError, match="another anybit run"):
        RunProgress.open(tmp_path / "out", {"run": 1})
    holder.kill()
    holder.wait()
    RunProgress.open(tmp_path / "out", {"run": 1}).close()
