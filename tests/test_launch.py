"""The SLURM launcher on a real cluster (CI starts one with .ci/slurm-up): serve.py and eval.py -m as jobs.

Skipped only when SLURM's client commands are missing. Jobs ask for what the CI node has (no GPU, 1 CPU, 2G).
Every test uses a fresh submitit folder: job ids restart when the cluster state is wiped.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from llada_xp.resolvers import gigabytes, minutes
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["launcher.gpus=0", "launcher.cpus=1", "launcher.mem=2G", "launcher.partition=debug"]

slurm = pytest.mark.skipif(shutil.which("sinfo") is None, reason="SLURM client commands (sinfo) are not installed")
pytestmark = [pytest.mark.slow, pytest.mark.slurm, slurm]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    tiny.write_hub_folder(d / "model", tiny.model(sharpen=4.0, dtype=torch.float32))
    (d / "qa.jsonl").write_text('{"prompt": "cat dog", "answer": "cat"}\n{"prompt": "dog", "answer": "dog"}\n')
    return d


@pytest.fixture(scope="module")
def model_args() -> list[str]:
    return ["model=demo", "model.name=tiny"]


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


class Output:
    """A process's merged stdout/stderr, read on a thread so that waiting for a line never blocks."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.text = proc, ""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.text += line

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.text)
            if m:
                return m
            if self.proc.poll() is not None:
                self.thread.join(2)
                m = re.search(pattern, self.text)
                if m:
                    return m
                raise AssertionError(f"exited {self.proc.returncode} before {pattern!r}:\n{self.text[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.text[-4000:]}")


def sacct_state(job_id: str, timeout: float = 20) -> str:
    deadline, state = time.time() + timeout, ""
    while time.time() < deadline:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State"], capture_output=True,
                             text=True).stdout.split()
        state = out[0] if out else ""
        if state and state not in ("PENDING", "RUNNING", "COMPLETING"):
            return state
        time.sleep(0.5)
    return state


def test_time_and_memory_are_read_in_slurm_formats():
    assert [minutes(t) for t in ("4:00:00", "1-00:00:00", "90", "1:30", "0:00:10")] == [240, 1440, 90, 2, 1]
    assert [gigabytes(m) for m in ("64G", "512M", "1T", None)] == [64, 1, 1024, None]
    with pytest.raises(ValueError, match="launcher.time"):
        minutes("four hours")


def as_a_background_job() -> None:
    """preexec_fn: start the child as a script's `serve.py &` does, SIGINT ignored (Python then installs no handler)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_served_job_is_reachable_with_its_key_and_cancelled_by_ctrl_c(tmp_path, model_args):
    from openai import AuthenticationError, OpenAI

    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "launcher=slurm", *SMALL,
                             f"launcher.folder={tmp_path}/slurm/%j", *model_args, "server.port=0",
                             f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, job_id = Output(proc), None
    try:
        job_id = out.wait_for(r"submitted job (\d+)", 30).group(1)
        out.wait_for(r"Reconnect later", 90)
        info_file = Path(out.wait_for(r"Server info:\s+(\S+)", 1).group(1))
        info = json.loads(info_file.read_text())
        assert info["job_id"] == job_id and f"ssh -N -L {info['port']}:{info['node']}:{info['port']}" in out.text
        assert f"job {job_id}: RUNNING" in out.text  # the state, shown live
        out.wait_for("Uvicorn running", 15)  # the job's log, streamed (it may land just after the block)
        key_file = Path(info["key_file"])
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()

        client = OpenAI(base_url=info["base_url"], api_key=key, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data][0] == "tiny"
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "cat"}],
                                               max_tokens=8, extra_body={"steps": 8, "block_length": 8})
        assert reply.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=info["base_url"], api_key="wrong", max_retries=0).models.list()

        connect = subprocess.run([sys.executable, "-m", "llada_xp.connect", job_id], capture_output=True, text=True,
                                 cwd=ROOT, env=env(), timeout=60)
        assert connect.returncode == 0, connect.stderr
        assert f"on node {info['node']}" in connect.stdout and "is healthy" in connect.stdout

        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        assert proc.returncode == 130
        assert sacct_state(job_id).startswith("CANCELLED")
    finally:
        if proc.poll() is None:
            proc.kill()
            if job_id:
                subprocess.run(["scancel", job_id])  # a failed test leaves no job holding the CI node


@pytest.mark.skipif(shutil.which("sinfo") is None or not __import__("importlib").util.find_spec("sglang_router"),
                    reason="needs SLURM and the gateway (pip install 'llada-xp[serve]')")
def test_replicas_run_as_one_job_behind_one_url_with_the_key_and_ctrl_c_cancels_all(tmp_path, model_args):
    import httpx

    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "launcher=slurm", *SMALL, "launcher.replicas=2",
                             f"launcher.folder={tmp_path}/slurm/%j", *model_args, "server.port=0",
                             f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, job_id = Output(proc), None
    try:
        job_id = out.wait_for(r"submitted job (\d+)", 120).group(1)
        out.wait_for(r"Reconnect later", 400)  # three processes start on a loaded 2-core machine: minutes
        assert out.text.count("llada-xp server is up") == 1 and "Replicas:     2 behind the gateway" in out.text
        info = json.loads(Path(out.wait_for(r"Server info:\s+(\S+)", 1).group(1)).read_text())
        assert info["job_id"] == job_id and len(info["replicas"]) == 2 and info["model"] == "tiny"
        assert len({(r["node"], r["port"]) for r in info["replicas"]} | {(info["node"], info["port"])}) == 3
        key = Path(info["key_file"]).read_text().strip()
        body = {"model": "tiny", "messages": [{"role": "user", "content": "cat"}], "max_tokens": 8}
        url = info["base_url"] + "/chat/completions"
        assert httpx.post(url, json=body, timeout=60).status_code == 401
        assert httpx.post(url, json=body, timeout=60, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        for r in info["replicas"]:  # each replica wants the key too
            assert httpx.post(r["url"] + "/v1/chat/completions", json=body, timeout=60).status_code == 401
        assert subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True,
                              text=True).stdout.split() == [job_id]  # one job
        connect = subprocess.run([sys.executable, "-m", "llada_xp.connect", job_id], capture_output=True, text=True,
                                 cwd=ROOT, env=env(), timeout=60)
        assert connect.returncode == 0 and f"port {info['port']}" in connect.stdout, connect.stdout + connect.stderr

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert sacct_state(job_id).startswith("CANCELLED")
        for r in [*info["replicas"], info]:
            with pytest.raises(httpx.TransportError):
                httpx.get(r["url"] + "/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            if job_id:
                subprocess.run(["scancel", job_id])  # a failed test leaves no job holding the CI node


def test_job_that_dies_is_reported_with_slurm_state_and_log_tail(tmp_path):
    t0 = time.time()
    p = subprocess.run([sys.executable, str(ROOT / "serve.py"), "launcher=slurm", *SMALL,
                        f"launcher.folder={tmp_path}/slurm/%j", "model=hf", f"model.path={tmp_path}/missing",
                        "server.port=0", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env(), text=True, capture_output=True,
                       timeout=120)
    assert p.returncode == 1
    assert re.search(r"ended: State=FAILED .*ExitCode=1", p.stdout), p.stdout[-3000:]
    assert "model folder not found" in p.stdout.split("ended:")[1]  # in the tail printed with the report
    assert time.time() - t0 < 60


def test_bad_partition_fails_at_submit_with_sbatch_reason(tmp_path, model_args):
    p = subprocess.run([sys.executable, str(ROOT / "serve.py"), "launcher=slurm", *SMALL, "launcher.partition=nope",
                        f"launcher.folder={tmp_path}/slurm/%j", *model_args, f"hydra.run.dir={tmp_path}/run"],
                       cwd=tmp_path, env=env(), text=True, capture_output=True, timeout=60)
    assert p.returncode == 1 and "invalid partition" in p.stdout.lower()


def node_has() -> tuple[int, int]:
    """The CPUs and memory (MB) of the cluster's (one) node, as SLURM sees it."""
    cpus, mem = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], capture_output=True, text=True,
                               check=True).stdout.split()[:2]
    return int(cpus), int(mem)


def test_job_that_can_never_start_is_cancelled_with_slurm_reason_and_the_request(tmp_path, model_args):
    cpus = node_has()[0] + 1  # more CPUs than the node has: sbatch accepts it, it pends with PartitionConfig
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "launcher=slurm", *SMALL, f"launcher.cpus={cpus}",
                             f"launcher.folder={tmp_path}/slurm/%j", *model_args, f"hydra.run.dir={tmp_path}/run"],
                            cwd=tmp_path, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, job_id = Output(proc), None
    try:
        job_id = out.wait_for(r"submitted job (\d+)", 60).group(1)
        t0 = time.time()
        assert proc.wait(timeout=60) == 1
        refused_s = time.time() - t0
        out.thread.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            if job_id:
                subprocess.run(["scancel", job_id])  # what the launcher should have done
    assert refused_s < 10, f"took {refused_s:.1f}s"
    assert f"job {job_id} cannot start as submitted (SLURM's reason: PartitionConfig); cancelled it" in out.text
    assert f"launcher.cpus={cpus} launcher.mem=2G launcher.gpus=0 launcher.time=4:00:00 " \
           "launcher.partition=debug" in out.text
    assert re.search(r"partition debug has: 1 node\(s\) with \d+ CPUs, \d+M memory, no GPUs", out.text), out.text
    assert subprocess.run(["squeue", "-h", "-t", "PENDING", "-j", job_id], capture_output=True,
                          text=True).stdout.strip() == ""  # not left pending
    assert sacct_state(job_id).startswith("CANCELLED")


def test_memory_the_node_lacks_is_refused_at_submit_with_the_request(tmp_path, model_args):
    mem = f"{node_has()[1] * 2}M"
    p = subprocess.run([sys.executable, str(ROOT / "serve.py"), "launcher=slurm", *SMALL, f"launcher.mem={mem}",
                        f"launcher.folder={tmp_path}/slurm/%j", *model_args, f"hydra.run.dir={tmp_path}/run"],
                       cwd=tmp_path, env=env(), text=True, capture_output=True, timeout=60)
    assert p.returncode == 1
    assert "cannot submit the server job" in p.stdout and "Requested node configuration is not available" in p.stdout
    assert f"asked for: launcher.cpus=1 launcher.mem={mem} " in p.stdout
    assert "partition debug has: 1 node(s)" in p.stdout


def test_served_job_takes_its_key_from_the_key_file_and_nothing_pickled_or_saved_holds_it(tmp_path, model_args):
    from openai import AuthenticationError, OpenAI

    key = "slurm-k3y-from-a-file-93ab"
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "launcher=slurm", *SMALL,
                             f"launcher.folder={tmp_path}/slurm/%j", *model_args, "server.port=0",
                             f"server.api_key_file={key_file}", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path,
                            env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=as_a_background_job)
    out, job_id = Output(proc), None
    try:
        job_id = out.wait_for(r"submitted job (\d+)", 30).group(1)
        info = json.loads(Path(out.wait_for(r"Server info:\s+(\S+)", 90).group(1)).read_text())
        assert Path(info["key_file"]).read_text().strip() == key
        assert OpenAI(base_url=info["base_url"], api_key=key, max_retries=0).models.list().data[0].id == "tiny"
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=info["base_url"], api_key="wrong", max_retries=0).models.list()
        holding = [p for p in tmp_path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
        assert sorted(holding) == sorted([key_file, Path(info["key_file"])])  # the two 0600 files only
        proc.send_signal(signal.SIGINT)  # started as a background job: SIGINT ignored until serve.py takes it
        assert proc.wait(timeout=60) == 130
        assert sacct_state(job_id).startswith("CANCELLED")
    finally:
        if proc.poll() is None:
            proc.kill()
            if job_id:
                subprocess.run(["scancel", job_id])  # a failed test leaves no job holding the CI node


def test_connect_reports_a_job_that_is_not_running():
    p = subprocess.run([sys.executable, "-m", "llada_xp.connect", "999999"], capture_output=True, text=True,
                       cwd=ROOT, env=env(), timeout=60)
    assert p.returncode == 1 and "is not running" in p.stderr


def test_eval_sweep_runs_as_a_job_array_and_a_failing_point_is_reported(tmp_path, tiny_dir):
    """Point 1 has an invalid threshold: it fails inside its job, point 0 still reports, the sweep exits 1."""
    sweep = tmp_path / "sweep"
    p = subprocess.run([sys.executable, str(ROOT / "eval.py"), "-m", "launcher=slurm", *SMALL,
                        "sampler.threshold=0.7,2.0", "model=hf", f"model.path={tiny_dir / 'model'}", "task=jsonl",
                        f"task.path={tiny_dir / 'qa.jsonl'}", "task.limit=2", "sampler.gen_length=8",
                        "sampler.steps=8", "sampler.block_length=8", "progress=false", f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, env=env(), text=True, capture_output=True, timeout=150)
    assert p.returncode == 1, p.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").exists() and not (sweep / "1" / "metrics.json").exists()
    failed = json.loads((sweep / "1" / "failed.json").read_text())
    assert "threshold" in failed["error"] and Path(failed["log"]).is_file()
    assert "1 failed point(s)" in (sweep / "report.md").read_text()
    arrays = [d.name for d in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", d.name)]
    assert len(arrays) == 2 and len({a.split("_")[0] for a in arrays}) == 1  # one array, two tasks
    array_id = arrays[0].split("_")[0]
    states = subprocess.run(["sacct", "-n", "-P", "-X", "-j", array_id, "-o", "State"], capture_output=True,
                            text=True).stdout.split()
    assert states == ["COMPLETED", "COMPLETED"]


def test_config_registers_schemas_without_importing_the_launcher_or_server():
    """config.py imports nothing of ours: register() must not pull launch.py (and through it the server) in."""
    code = ("import sys; from llada_xp.config import register; register(); "
            "print(sorted(m for m in sys.modules if m.startswith('llada_xp.') and m != 'llada_xp.model'))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env(), timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["['llada_xp.config']"]
