"""serve.py as a command: where the API key may come from, and where Hydra writes its output dir.

A key never lands in what Hydra saves (.hydra/*.yaml): server.api_key is refused before Hydra writes anything,
the key comes from $LLADA_XP_API_KEY or a 0600 file (server.api_key_file). Every run gets its own output dir.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from hydra import compose, initialize_config_dir

from llada_xp import resolvers
from llada_xp.config import register

ROOT = Path(__file__).resolve().parents[1]
KEY = "k3y-that-must-not-leak-7f1c"


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def serve(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "serve.py"), *args], cwd=cwd, env=env(), text=True,
                          capture_output=True, timeout=120, **kw)


def files_holding(folder: Path, text: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("args", [[f"server.api_key={KEY}"], ["-m", f"server.api_key={KEY},other"]],
                         ids=["run", "sweep"])
def test_api_key_on_the_command_line_is_refused_before_hydra_saves_anything(tmp_path, args):
    p = serve([*args, "server.port=0"], tmp_path)
    assert p.returncode == 1
    assert "LLADA_XP_API_KEY" in p.stderr and "server.api_key_file" in p.stderr
    assert KEY not in p.stdout + p.stderr
    assert list(tmp_path.iterdir()) == []  # no output dir, no .hydra files


@pytest.mark.slow
def test_key_file_others_can_read_is_refused(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o640)
    p = serve([f"server.api_key_file={key_file}", "server.port=0", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert p.returncode == 1 and f"chmod 600 {key_file}" in p.stdout + p.stderr
    assert files_holding(tmp_path / "run", KEY) == []


@pytest.mark.slow
def test_server_requires_the_key_from_its_file_and_no_output_file_holds_it(tmp_path):
    key_file = tmp_path / "secret" / "key"
    key_file.parent.mkdir()
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), f"server.api_key_file={key_file}",
                             f"server.port={port}"], cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 90
        while True:
            assert proc.poll() is None, "serve.py exited"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "no /health within 90 s"
            time.sleep(0.3)
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    outputs = tmp_path / "outputs"
    assert len(list(outputs.glob("*/*/.hydra/config.yaml"))) == 1  # Hydra did save the run ...
    assert files_holding(outputs, KEY) == []  # ... with the key file's path, never the key


@pytest.mark.parametrize("primary,key,parent", [("serve", "run", "outputs"), ("eval", "run", "outputs/eval"),
                                                 ("eval", "sweep", "multirun/eval")])
def test_two_runs_in_the_same_second_get_their_own_output_dirs(primary, key, parent):
    register()
    resolvers.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        run_dir = lambda: str(compose(primary, return_hydra_config=True).hydra[key].dir)  # noqa: E731
        run_dir()  # warm: a compose then takes milliseconds (on a loaded CI machine sometimes more: retry)
        for _ in range(10):
            while time.time() % 1 > 0.5:
                time.sleep(0.05)
            (parent_a, a), (parent_b, b) = (run_dir().rsplit("/", 1) for _ in range(2))
            assert parent_a == parent_b == f"{parent}/{time.strftime('%Y-%m-%d')}"
            assert a != b  # in folders of their own ...
            if a[:8] == b[:8]:
                break
    assert a[:8] == b[:8]  # ... though started in the same second (HH-MM-SS)


@pytest.mark.slow
def test_two_serve_processes_started_together_keep_their_own_hydra_files(tmp_path):
    """Both fail to load (missing model folder) right after Hydra saved their config: one dir each."""
    procs = [subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "model=hf", f"model.path={tmp_path}/missing",
                               f"server.port={port}"], cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for port in (1111, 2222)]
    assert [p.wait(timeout=120) for p in procs] == [1, 1]
    saved = sorted((tmp_path / "outputs").glob("*/*/.hydra/overrides.yaml"))
    assert len(saved) == 2
    assert ["server.port=1111" in f.read_text() for f in saved].count(True) == 1
    assert ["server.port=2222" in f.read_text() for f in saved].count(True) == 1
