"""The benchmark CLIs run end to end on the demo model and print their tables (figures are not asserted: timing);
the demo training CLI's help."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
QUICK = ("--concurrency", "1", "--requests", "2", "--rounds", "1", "--max-tokens", "8")  # a server bench in seconds


def bench(*args: str, timeout: float = 300) -> str:
    p = subprocess.run([sys.executable, "-m", "llada_xp.bench", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def header(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("server bench:"))


@pytest.mark.slow
def test_sampler_bench_prints_every_mode_with_the_baseline_first():
    out = bench("sampler", "--gen-length", "16", "--block-length", "8", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    assert len(rows) == 7 and rows[0].startswith("| llada (no cache, quota) | 16 |") and rows[0].endswith("1.00x |")
    tau = next(r for r in rows if r.startswith("| dual cache, tau 0.9"))
    assert int(tau.split("|")[2]) < 16  # the demo model commits several tokens per forward


@pytest.mark.slow
def test_server_bench_prints_one_row_per_level_and_the_sampler_ceiling():
    out = bench("server", "--concurrency", "1,3", "--requests", "6", "--rounds", "2", "--max-tokens", "32")
    head = next(line for line in out.splitlines() if line.strip().startswith("conc"))
    assert "sampler tok/s" in head
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d+", line)]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(1, 6), (3, 6)]  # every request answered (errors exit 1)
    assert all(int(r[2]) > 0 and float(r[4]) > 0 and float(r[-2]) > 0 for r in rows)
    assert "llada-xp-demo" in out and "max_tokens 32" in out
    assert "server started here" in header(out) and "1 torch threads" in header(out)  # the bench's default


@pytest.mark.slow
def test_server_bench_serves_on_the_port_given_as_an_override():
    port = free_port()
    out = bench("server", *QUICK, "--no-ceiling", f"server.port={port}", timeout=120)
    assert f"server started here at http://127.0.0.1:{port}," in header(out)


def test_server_bench_refuses_a_port_in_use_before_starting_anything():
    from llada_xp.bench import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(SystemExit, match=f"server.port={s.getsockname()[1]}: .*in use"):
            main(["server", *QUICK, f"server.port={s.getsockname()[1]}"])


def test_server_bench_refuses_overrides_for_a_running_server():
    from llada_xp.bench import main

    with pytest.raises(SystemExit, match="with --url the server is already running"):
        main(["server", "--url", "http://127.0.0.1:9", "sampler=llada"])


@pytest.mark.slow
def test_server_bench_of_an_external_server_does_not_claim_its_thread_count():
    port = free_port()
    server = subprocess.Popen([sys.executable, "serve.py", f"server.port={port}", "model.threads=2",
                               "server.log_level=warning"], cwd=ROOT, env=ENV)
    try:
        head = header(bench("server", "--url", f"http://127.0.0.1:{port}", *QUICK, timeout=120))
    finally:
        server.terminate()
        server.wait(15)
    assert f"external server http://127.0.0.1:{port}," in head and "1 torch threads" not in head
    assert "2 torch threads" in head or "torch threads not reported" in head  # from /health, if it says


def test_demo_train_help_names_the_module_and_shows_every_default(capsys, monkeypatch):
    from llada_xp.demo.train import parse_args

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m llada_xp.demo.train [-h] [--seed SEED]")
    assert out.count("(default: ") == len(re.findall(r"^  --", out, re.M)) > 20
    assert re.search(r"--steps STEPS\s+optimizer steps .*\(default: 8000\)", out)
    assert re.search(r"--batch-size BATCH_SIZE\s+examples per optimizer step \(default: 32\)", out)


@pytest.mark.slow
def test_scheduler_bench_prints_static_beside_continuous():
    out = bench("scheduler", "--long-gen", "64", "--shorts", "3", "--requests", "6", "--eval-limit", "8",
                "--eval-gen-length", "32", "--max-batch-size", "4")
    rows = [line for line in out.splitlines() if line.startswith("| (")]
    assert len(rows) == 9 and rows[0].startswith("| (a) short p50 latency")
    assert all(re.fullmatch(r"\| .+ \| [\d.]+ \| [\d.]+ \| ([\d.]+|nan)x \|", r) for r in rows), rows


@pytest.mark.slow
def test_replica_bench_runs_the_policy_asked_and_prints_one_row_per_level():
    """One policy (each costs a start of two replicas and the gateway: minutes on a 2-core CI machine)."""
    pytest.importorskip("sglang_router", reason="the gateway (pip install 'llada-xp[serve]') is not installed")
    out = bench("server", *QUICK, "--replicas", "2", "--policy", "power_of_two", timeout=600)
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+2\s+[a-z_]+\s+1\s", line)]
    assert [r[1] for r in rows] == ["power_of_two"] and rows[0][-1] == "1.00"
    assert all(int(r[3]) == 2 for r in rows)  # every request answered


def test_replica_bench_refuses_a_policy_without_a_gateway_or_given_twice():
    from llada_xp.bench import main

    with pytest.raises(SystemExit, match="needs --replicas with a count above 1"):
        main(["server", *QUICK, "--policy", "round_robin"])
    with pytest.raises(SystemExit, match="not both"):
        main(["server", *QUICK, "--replicas", "2", "--policy", "round_robin", "server.policy=random"])
