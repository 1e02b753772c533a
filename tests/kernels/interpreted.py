"""Running a test module's cases under Triton's interpreter: the mode must be set before triton is
first imported, so the module runs itself as a worker in a subprocess and prints a JSON object."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def require_interpreter() -> None:
    """Skip unless Triton's interpreter can run anybit's kernels (Triton 3.9 or newer)."""
    triton = pytest.importorskip("triton")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
        # Seen with Triton 3.6: its interpreter raises TypeError ("only 0-dimensional arrays can
        # be converted to Python scalars") in ``range`` over a kernel argument, in every kernel
        # here. The compiled kernels are tested on CUDA.
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run these kernels; 3.9 can")


def worker_results(path: str, **env) -> dict:
    """The last JSON line that ``python path`` prints with TRITON_INTERPRET=1 (skips where
    ``require_interpreter`` does)."""
    require_interpreter()
    proc = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TRITON_INTERPRET="1", **env))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1])
