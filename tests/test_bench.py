"""The benchmark CLIs run end to end on the demo model and print their tables (figures are not asserted: timing)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def bench(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "llada_xp.bench", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_sampler_bench_prints_every_mode_with_the_baseline_first():
    out = bench("sampler", "--gen-length", "16", "--block-length", "8", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    assert len(rows) == 7 and rows[0].startswith("| llada (no cache, quota) | 16 |") and rows[0].endswith("1.00x |")
    tau = next(r for r in rows if r.startswith("| dual cache, tau 0.9"))
    assert int(tau.split("|")[2]) < 16  # the demo model commits several tokens per forward


def test_server_bench_prints_one_row_per_level_and_the_sampler_ceiling():
    out = bench("server", "--concurrency", "1,3", "--requests", "6", "--rounds", "2", "--max-tokens", "32")
    head = next(line for line in out.splitlines() if line.strip().startswith("conc"))
    assert "sampler tok/s" in head
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d+", line)]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(1, 6), (3, 6)]  # every request answered (errors exit 1)
    assert all(int(r[2]) > 0 and float(r[4]) > 0 and float(r[-2]) > 0 for r in rows)
    assert "llada-xp-demo" in out and "max_tokens 32" in out
