"""Every benchmark script at least imports (a rename once left one crashing on import)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("bench_*.py")))
def test_benchmark_imports(script: str) -> None:
    out = subprocess.run([sys.executable, "-c", f"import {script}"], cwd=BENCHMARKS,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
