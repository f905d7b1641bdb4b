"""Run the server as a SLURM job through submitit, and tell the user how to reach it.

`serve_on_slurm(cfg)` submits `serve()` as a batch job, shows the job's state and its log live, prints the
connection block once /health answers through the node's address, and cancels the job on Ctrl-C (or detaches).
The job binds 0.0.0.0, advertises the node's name and always requires an API key (kept in a 0600 file).
Also where serve.py's API key comes from (never from Hydra's saved config: `KeyGuard`, `api_key`).
Replicas (server.replicas=N here, launcher.replicas=N on SLURM): N server processes, each `server.serve` with one
model, behind the sglang-router gateway (on a private port of 127.0.0.1) behind the front (front.py: it carries
LLaDA's chat fields past the gateway) on the one public address (`serve_replicas`, `replica_task`); the gateway and
every replica require the API key when there is one. Started as `python -m llada_xp.launch replica|gateway|front`,
so that neither the key nor the config shows on a command line.
Writes to the terminal stream it is given (it is the CLI's front end); knows nothing about models or HTTP routes
beyond /health. Evaluation sweeps use hydra-submitit-launcher instead (conf/launcher/slurm.yaml).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, TextIO

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from llada_xp.config import LauncherConfig, ServeConfig, ServerConfig
from llada_xp.resolvers import minutes

log = logging.getLogger(__name__)

INFO_FILE = "server_info.json"
KEY_FILE = "api_key"
POLL_S = 0.5
GATEWAY = "sglang-router==0.3.2"  # pinned: its CLI flags and worker protocol are what this file was tested with
STOP_S = 15  # a replica or the gateway that has not stopped this long after SIGTERM is killed
# States in which a job no longer runs (squeue shows them for MinJobAge after the end, sacct afterwards)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
# PENDING reasons that mean the job cannot start as submitted (SLURM's job_reason_codes page): a partition limit
# the request exceeds, constraints no node meets, an account or QOS it may not use, a per-job or per-node maximum
# (or a minimum) of its QOS or association. Reasons that can pass are waited out: Resources, Priority, aggregate
# limits (*Grp*, *PerUser, *PerAccount), PartitionDown, NodeDown, ReqNodeNotAvail (e.g. a maintenance reservation).
NEVER = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "AccountNotAllowed",
         "QOSNotAllowed", "InvalidAccount", "InvalidQOS", "MaxMemPerLimit", "DependencyNeverSatisfied",
         "ReservationDeleted"}
NEVER_LIMIT = re.compile(r"(Assoc|QOS)Max\w*Per(Job|Node)\w*|QOSMin\w+")


# --------------------------------------------------------------------------------------------- resources
def executor(lc: LauncherConfig, folder: str):
    """A submitit executor for SLURM with the resources of `lc` (sbatch fails at submit if they don't exist)."""
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = dict(slurm_job_name=lc.job_name, timeout_min=minutes(lc.time), cpus_per_task=lc.cpus,
                  slurm_additional_parameters=dict(lc.additional_parameters), slurm_setup=list(lc.setup))
    for key, value in (("slurm_account", lc.account), ("slurm_partition", lc.partition), ("slurm_qos", lc.qos),
                       ("slurm_mem", lc.mem), ("slurm_constraint", lc.constraint)):
        if value is not None:
            params[key] = value
    if lc.gpus:
        params["gpus_per_node"] = lc.gpus
    if lc.replicas > 1:  # one task per replica, as many on every node
        params["nodes"], params["tasks_per_node"] = lc.nodes, lc.replicas // lc.nodes
    if lc.container_image:
        params["slurm_srun_args"] = shlex.split(lc.container_flags.format(image=lc.container_image, cwd=os.getcwd()))
    ex.update_parameters(**params)
    return ex


# ------------------------------------------------------------------------------------------------- the API key
class KeyGuard(Callback):
    """Hydra callback (conf/serve.yaml): refuse a literal server.api_key before Hydra saves the composed config.

    Hydra writes the config and the overrides in plaintext (.hydra/*.yaml, world-readable) and a key on the
    command line shows in `ps` and the shell history; the key comes from $LLADA_XP_API_KEY or server.api_key_file.
    An interpolation (server.api_key='${oc.env:MY_KEY}') is saved as written, so it passes.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config)

    @staticmethod
    def _check(config: DictConfig) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        server = config.get("server")
        literal = server is not None and server.get("api_key") is not None \
            and not OmegaConf.is_interpolation(server, "api_key")
        swept = any(o.key_or_group == "server.api_key" and o.is_sweep_override()
                    for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)))
        if literal or swept:
            sys.stderr.write("serve.py: refusing server.api_key on the command line or in a config file: Hydra would "
                             "save it in plaintext under the output dir (.hydra/*.yaml), and a command line shows in "
                             "`ps`. Pass the key as LLADA_XP_API_KEY=KEY python serve.py ..., or in a file only you can "
                             "read: server.api_key_file=PATH (chmod 600 PATH).\n")
            sys.exit(1)


def read_key_file(path: str) -> str:
    """The key in `path` (alone on one line); a file that other users may access is refused, as ssh does."""
    p = Path(path).expanduser()
    try:
        mode, text = p.stat().st_mode & 0o777, p.read_text()
    except OSError as e:
        raise ValueError(f"server.api_key_file: cannot read {path}: {e.strerror}") from None
    if mode & 0o077:
        raise ValueError(f"server.api_key_file: {path} is accessible by other users (mode {mode:o}); "
                         f"chmod 600 {path}")
    key = text.strip()
    if not key or any(c.isspace() for c in key):
        raise ValueError(f"server.api_key_file: {path} must hold the key alone on one line")
    return key


def api_key(sc: ServerConfig) -> Optional[str]:
    """The server's key: server.api_key (set by code), else server.api_key_file, else $LLADA_XP_API_KEY, else None."""
    if sc.api_key:
        return sc.api_key
    if sc.api_key_file:
        return read_key_file(sc.api_key_file)
    return os.environ.get("LLADA_XP_API_KEY") or None


# ------------------------------------------------------------------------------------------------- in the job
def advertised_host() -> str:
    """The name other machines reach this node by: its FQDN, else its hostname when the FQDN is only localhost."""
    fqdn = socket.getfqdn()
    return socket.gethostname() if fqdn.startswith("localhost") or not fqdn else fqdn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by the owner only (mode 0600 from creation on, never world-readable)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def serve_job(cfg: ServeConfig) -> None:
    """The job's body: bind the node's address with an API key, write the server-info file, serve until cancelled."""
    import submitit

    from llada_xp.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = submitit.JobEnvironment()
    folder = Path(env.paths.folder).resolve()
    if cfg.launcher.replicas > 1:
        return replica_task(cfg, env.global_rank, env.local_rank, env.num_tasks, str(env.job_id), folder)
    node, port = advertised_host(), cfg.server.port or _free_port()
    key = api_key(cfg.server) or secrets.token_urlsafe(32)
    write_private(folder / KEY_FILE, key + "\n")
    cfg.server.host, cfg.server.port, cfg.server.api_key = "0.0.0.0", port, key
    info = {"job_id": str(env.job_id), "node": node, "port": port, "url": f"http://{node}:{port}",
            "base_url": f"http://{node}:{port}/v1", "health_url": f"http://{node}:{port}/health",
            "key_file": str(folder / KEY_FILE)}
    tmp = folder / (INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(folder / INFO_FILE)
    log.info("job %s: serving on %s (API key in %s)", env.job_id, info["url"], info["key_file"])
    serve(cfg)


# ------------------------------------------------------------------------------------------------ SLURM queries
@dataclass
class JobState:
    state: str  # PENDING, RUNNING, FAILED, ... ("" = SLURM does not know the job yet)
    reason: str = ""
    node: str = ""
    exit_code: str = ""
    partition: str = ""


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def job_state(job_id: str) -> JobState:
    """The job's state and reason: squeue while SLURM holds it, sacct (accounting) after that."""
    line = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%r|%N|%P"]).splitlines()
    if line:
        state, reason, node, partition = (line[0].split("|") + ["", "", ""])[:4]
        return JobState(state, "" if reason == "None" else reason, node, partition=partition)
    return job_state_from_sacct(job_id) or JobState("")


def never_starts(reason: str) -> bool:
    """Whether a PENDING job's reason means that it cannot start as submitted (NEVER)."""
    code = reason.split(",")[0].strip()  # "ReqNodeNotAvail, UnavailableNodes:..." -> the code
    return code in NEVER or NEVER_LIMIT.fullmatch(code) is not None


def requested(lc: LauncherConfig, partition: str) -> str:
    """What the job asks for, as the options that set it."""
    asked = [f"launcher.cpus={lc.cpus}", f"launcher.mem={lc.mem or 'the partition default'}",
             f"launcher.gpus={lc.gpus}", f"launcher.time={lc.time}",
             f"launcher.partition={lc.partition}" if lc.partition else f"partition {partition or '?'} (the default)"]
    asked += [f"launcher.{k}={v}" for k, v in (("account", lc.account), ("qos", lc.qos),
                                                ("constraint", lc.constraint)) if v is not None]
    if lc.replicas > 1:
        asked += [f"launcher.replicas={lc.replicas}", f"launcher.nodes={lc.nodes}"]
    asked += [f"--{k}={v}" for k, v in lc.additional_parameters.items()]
    return " ".join(asked)


def partition_offer(partition: str) -> str:
    """What the partition's nodes have, from sinfo ("" when SLURM does not know the partition)."""
    groups = []
    for row in _run(["sinfo", "-h", "-p", partition, "-o", "%D|%c|%m|%G|%l"]).splitlines():
        nodes, cpus, mem, gres, limit = (row.split("|") + [""] * 4)[:5]
        groups.append(f"{nodes} node(s) with {cpus} CPUs, {mem}M memory, "
                      + ("no GPUs" if gres in ("", "(null)") else f"GRES {gres}") + f", time limit {limit}")
    return "; ".join(groups)


def default_partition() -> str:
    return next((p.rstrip("*") for p in _run(["sinfo", "-h", "-o", "%P"]).split() if p.endswith("*")), "")


def stdout_folder(job_id: str) -> Optional[Path]:
    """The folder holding the job's stdout log (submitit's job folder), from `scontrol show job`."""
    m = re.search(r"StdOut=(\S+)", _run(["scontrol", "show", "job", job_id]))
    return Path(m.group(1)).parent if m else None


def health(url: str, timeout: float = 2.0) -> Optional[dict]:
    """The /health body when the server answers 200, else None."""
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per poll in the user's terminal
    try:
        r = httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    try:
        body = r.json()
    except ValueError:  # the gateway's /health answers plain "OK"
        return {}
    return body if isinstance(body, dict) else {}


# ------------------------------------------------------------------------------------------------ the terminal
class Tail:
    """Follows a growing log file, writing its complete new lines to a stream."""

    def __init__(self, path: Path, stream: TextIO):
        self.path, self.stream, self.offset, self.partial = path, stream, 0, b""

    def pump(self, final: bool = False) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = b"" if final else lines.pop()
        for ln in lines if not final else [x for x in lines if x]:
            self.stream.write(ln.decode(errors="replace") + "\n")
        self.stream.flush()


def last_lines(path: Path, n: int = 30) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def connection_block(job_id: str, node: str, port: int, login: str, key_file: Optional[str],
                     info_file: Optional[str], model: Optional[str], info: Optional[dict] = None) -> str:
    """What the user needs to reach the server: the tunnel, the local URLs, a curl and an openai-client line."""
    user, local = getpass.getuser(), f"http://localhost:{port}"
    key = f"$(cat {key_file})" if key_file else "$LLADA_XP_API_KEY"
    model = model or "MODEL"
    lines = [
        "=" * 78,
        f"llada-xp server is up: SLURM job {job_id} on node {node}, port {port}",
        "=" * 78,
        f"API key:      {key_file or 'the configured key (server.api_key / $LLADA_XP_API_KEY)'}"
        + (" (readable by you only)" if key_file else ""),
    ]
    if info_file:
        lines.append(f"Server info:  {info_file}")
    if info and info.get("replicas"):
        lines.append(f"Replicas:     {len(info['replicas'])} behind the gateway at this address (each one's "
                     f"address and /metrics: Server info); gateway metrics: {info.get('metrics_url')}")
    lines += [
        "",
        "1. On your machine, open an SSH tunnel (leave it running):",
        f"   ssh -N -L {port}:{node}:{port} {user}@{login}",
        "2. Then use the server at:",
        f"   Health: {local}/health",
        f"   Docs:   {local}/docs",
        f"   API:    {local}/v1",
        "3. Test it (copy the key file to your machine, or run these on the cluster with the node's URL):",
        f"   export LLADA_XP_API_KEY={key}",
        f'   curl -s {local}/v1/chat/completions -H "Authorization: Bearer $LLADA_XP_API_KEY" '
        f"-H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", \"messages\": "
        "[{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 32}'",
        f"   python -c \"import os; from openai import OpenAI; c = OpenAI(base_url='{local}/v1', "
        f"api_key=os.environ['LLADA_XP_API_KEY']); print(c.chat.completions.create(model='{model}', "
        "messages=[{'role': 'user', 'content': 'Hello'}], max_tokens=32).choices[0].message.content)\"",
        "",
        f"On the cluster (no tunnel): http://{node}:{port}/v1",
        f"Stop: Ctrl-C here, or scancel {job_id}.  Reconnect later: python -m llada_xp.connect {job_id}",
        "=" * 78,
    ]
    return "\n".join(lines) + "\n"


def login_host(configured: Optional[str]) -> str:
    return configured or os.environ.get("SLURM_SUBMIT_HOST") or socket.getfqdn()


# ------------------------------------------------------------------------------------------------ submitter
def serve_on_slurm(cfg: ServeConfig, out: TextIO = sys.stdout) -> int:
    """Submit the server, follow it until it ends or Ctrl-C; the process exit status (0 ok, 1 failed, 130 Ctrl-C)."""
    from submitit.core.utils import FailedJobError

    lc = cfg.launcher

    def say(msg: str) -> None:
        out.write(f"[launch] {msg}\n")
        out.flush()

    try:
        api_key(cfg.server)  # a bad key file fails here, not on the node (the job reads it again: nothing is pickled)
        ex = executor(lc, lc.folder)
        job = ex.submit(serve_job, cfg)
    except (FailedJobError, RuntimeError, OSError, ValueError) as e:
        say(f"cannot submit the server job: {str(e).strip()}")
        if isinstance(e, FailedJobError):  # sbatch refused the request
            _explain_request(lc, lc.partition or default_partition(), say)
        return 1
    job_id = str(job.job_id)
    folder = Path(job.paths.folder).resolve()
    say(f"submitted job {job_id} (name {lc.job_name}, partition {lc.partition or 'default'}); logs in {folder}")
    tails = [Tail(Path(job.paths.stdout), out), Tail(Path(job.paths.stderr), out)]
    info_file = folder / INFO_FILE
    last, connected = None, False
    previous_int = _ctrl_c_interrupts()
    try:
        while True:
            st = job_state(job_id)
            for t in tails:
                t.pump()
            shown = (st.state, st.reason)
            if st.state and shown != last:
                say(f"job {job_id}: {st.state}" + (f" ({st.reason})" if st.reason else "")
                    + (f" on {st.node}" if st.state == "RUNNING" and st.node else ""))
                last = shown
            if st.state in ENDED:
                time.sleep(POLL_S)
                for t in tails:
                    t.pump(final=True)
                return _report_end(job_id, st, job, say, connected)
            if st.state == "PENDING" and never_starts(st.reason):
                job.cancel(check=False)
                end = _wait_ended(job_id)
                say(f"job {job_id} cannot start as submitted (SLURM's reason: {st.reason}); "
                    + ("cancelled it" if end.state in ENDED or not end.state else f"scancel {job_id} sent"))
                _explain_request(lc, st.partition or lc.partition or default_partition(), say)
                return 1
            if st.state == "RUNNING" and not connected and info_file.exists():
                info = json.loads(info_file.read_text())
                body = health(info["health_url"])
                if body is not None:
                    connected = True
                    out.write(connection_block(job_id, info["node"], info["port"], login_host(lc.login_host),
                                               info["key_file"], str(info_file),
                                               info.get("model") or (body.get("model") or {}).get("name"), info))
                    out.flush()
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        if lc.detach_on_interrupt:
            say(f"detached; job {job_id} keeps running. Reconnect: python -m llada_xp.connect {job_id}; "
                f"stop: scancel {job_id}")
            return 0
        say(f"Ctrl-C: cancelling job {job_id}")
        job.cancel(check=False)
        st = _wait_ended(job_id)
        for t in tails:
            t.pump(final=True)
        say(f"job {job_id}: {st.state or 'gone'}")
        return 130
    finally:
        signal.signal(signal.SIGINT, previous_int)


def _wait_ended(job_id: str, timeout: float = 30) -> JobState:
    """Poll until SLURM shows the job ended (or forgets it), at most `timeout` seconds; its last state."""
    deadline = time.time() + timeout
    while True:
        st = job_state(job_id)
        if st.state in ENDED or not st.state or time.time() > deadline:
            return st
        time.sleep(POLL_S)


def _explain_request(lc: LauncherConfig, partition: str, say) -> None:
    say(f"asked for: {requested(lc, partition)}")
    offer = partition_offer(partition) if partition else ""
    if offer:
        say(f"partition {partition} has: {offer}")
    say("ask for what a partition has (launcher.cpus, launcher.mem, launcher.gpus, launcher.time) "
        "or pick another one (launcher.partition)")


def _report_end(job_id: str, st: JobState, job, say, connected: bool) -> int:
    """The job ended by itself: SLURM's state, reason and exit code, the log tail; 0 only if it completed."""
    acct = job_state_from_sacct(job_id) or st
    say(f"job {job_id} ended: State={acct.state} Reason={acct.reason or st.reason or 'None'} "
        f"ExitCode={acct.exit_code or '?'}" + ("" if connected else " (the server never answered)"))
    for name, path in (("stderr", Path(job.paths.stderr)), ("stdout", Path(job.paths.stdout))):
        tail = last_lines(path)
        if tail:
            say(f"last lines of {path} ({name}):")
            for ln in tail:
                say("  " + ln)
    return 0 if acct.state == "COMPLETED" else 1


def job_state_from_sacct(job_id: str) -> Optional[JobState]:
    rows = _run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,Reason,NodeList,ExitCode"]).splitlines()
    if not rows:
        return None
    state, reason, node, code = (rows[0].split("|") + ["", "", ""])[:4]
    return JobState(state.split()[0] if state else "", "" if reason == "None" else reason, node, code)


# ------------------------------------------------------------------------------------------------ replicas
# The gateway (sglang-router) in front of N replicas. Its choices that matter here (README: Replicas):
# - the circuit breaker is off: it counts 4xx answers as failures, so ten bad requests from one client would
#   open every replica's circuit and answer 503 to everyone for a minute; health checks take a dead replica out;
# - health checks every 2 s, out after 2 failures, back after 1 success; retries (its default: 5) resend a request
#   that found a dead replica to another one.
GATEWAY_FLAGS = ["--disable-circuit-breaker", "--health-check-interval-secs", "2", "--health-failure-threshold", "2",
                 "--health-success-threshold", "1", "--worker-startup-check-interval", "1",
                 "--shutdown-grace-period-secs", "5"]


def require_gateway() -> None:
    """Raise RuntimeError saying how to install the gateway when sglang-router is missing."""
    import importlib.util

    if importlib.util.find_spec("sglang_router") is None:
        raise RuntimeError(f"replicas need the sglang-router gateway, which is not installed: pip install "
                           f"'llada-xp[serve]' (or pip install {GATEWAY})")


def gateway_command(sc: ServerConfig, port: int, metrics_host: str, metrics_port: int,
                    workers: list[str]) -> list[str]:
    """The gateway's command line, on 127.0.0.1:port behind the front (never the key: `python -m llada_xp.launch
    gateway` takes it from the env)."""
    level = {"critical": "error", "error": "error", "debug": "debug", "trace": "debug"}.get(sc.log_level, "warn")
    return [sys.executable, "-m", "llada_xp.launch", "gateway", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *workers, "--policy", sc.policy, "--prometheus-host", metrics_host,
            "--prometheus-port", str(metrics_port), "--log-level", level, *GATEWAY_FLAGS, *sc.gateway_args]


def front_command(sc: ServerConfig, host: str, port: int, gateway_port: int, model: Optional[str]) -> list[str]:
    """The front's command line: the public host:port, forwarding to the gateway on 127.0.0.1:gateway_port, the served
    model's name (never the key: `python -m llada_xp.launch front` takes it from the env, as the gateway)."""
    level = sc.log_level if sc.log_level in ("critical", "error", "warning", "debug", "trace") else "warning"
    return [sys.executable, "-m", "llada_xp.launch", "front", host, str(port), f"http://127.0.0.1:{gateway_port}",
            level, model or ""]


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies (Linux), even by SIGKILL."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _gpus(device: str) -> list[str]:
    """The CUDA devices replicas may take one each ([] on CPU or when model.device names one device)."""
    if device not in ("auto", "cuda"):
        return []
    import torch

    count = torch.cuda.device_count()
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (visible or [str(i) for i in range(count)])[:count]


@dataclass
class Replica:
    """One server process on a private port: its environment (devices, threads) and CPU cores."""

    index: int
    port: int
    env: dict
    cores: list[int] = field(default_factory=list)
    proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, cfg: ServeConfig) -> None:
        import pickle

        def setup() -> None:
            _die_with_parent()
            if self.cores:
                os.sched_setaffinity(0, self.cores)

        # its own session: a Ctrl-C in the terminal reaches serve.py only, which stops the replicas in order
        self.proc = subprocess.Popen([sys.executable, "-m", "llada_xp.launch", "replica", str(self.index)],
                                     stdin=subprocess.PIPE, env=self.env, preexec_fn=setup, start_new_session=True)
        mine = replace(cfg, server=replace(cfg.server, host="127.0.0.1", port=self.port, replicas=1))
        self.proc.stdin.write(pickle.dumps(mine))  # the config, key included, through a pipe: no file, no argv
        self.proc.stdin.close()


def plan_replicas(cfg: ServeConfig) -> list[Replica]:
    """N replicas on free ports of 127.0.0.1: one GPU each when GPUs exist (shared round-robin when there are fewer
    GPUs than replicas), else an equal share of this process's CPU cores (pinned, OMP_NUM_THREADS set)."""
    n, gpus = cfg.server.replicas, _gpus(cfg.model.device)
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // n)
    if gpus and len(gpus) < n:
        log.warning("%d replicas on %d GPUs: some GPUs hold more than one model", n, len(gpus))
    if not gpus and len(cores) < n:
        log.warning("%d replicas on %d CPU cores: replicas share cores", n, len(cores))
    out = []
    for i in range(n):
        env = dict(os.environ, OMP_NUM_THREADS=str(per), MKL_NUM_THREADS=str(per))
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        mine = cores[i * per:(i + 1) * per] if len(cores) >= n else []
        out.append(Replica(i, _free_port_on("127.0.0.1"), env, mine))
    return out


def _free_port_on(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process still running, wait up to STOP_S, then SIGKILL the rest."""
    live = [p for p in procs if p is not None and p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.time() + STOP_S
    for p in live:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop within %ds; killing it", p.pid, STOP_S)
            p.kill()
            p.wait()


def _wait_gateway(url: str, name: Optional[str], key: Optional[str], alive: callable, timeout: float = 120) -> bool:
    """Until the gateway lists the model on /v1/models (its workers are registered), or it dies, or timeout."""
    import httpx

    deadline = time.time() + timeout
    headers = {"Authorization": f"Bearer {key}"} if key else {}  # the front wants the key on /v1/*, as a replica
    while time.time() < deadline and alive():
        try:
            r = httpx.get(url + "/v1/models", timeout=2, headers=headers)
            if r.status_code == 200 and any(m.get("id") == name for m in r.json().get("data", [])):
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(POLL_S)
    return False


def serve_replicas(cfg: ServeConfig) -> int:
    """server.replicas=N here: N replicas and the gateway on server.host:server.port, until Ctrl-C or SIGTERM.

    A replica that dies is logged and left out (the gateway's health check stops routing to it; no restart: a
    replica that crashed once, e.g. out of memory, would most likely crash again); serving ends, with status 1,
    when the gateway dies or no replica is left. The exit status: 0 after Ctrl-C/SIGTERM, 1 on failure."""
    sc = cfg.server
    try:
        require_gateway()
    except RuntimeError as e:
        log.error("cannot serve: %s", e)
        return 1
    replicas = plan_replicas(cfg)
    port = sc.port or _free_port_on(sc.host)
    metrics_port = sc.metrics_port or _free_port_on(sc.host)
    gateway: Optional[subprocess.Popen] = None
    front: Optional[subprocess.Popen] = None
    previous = signal.signal(signal.SIGTERM, _interrupt)
    previous_int = _ctrl_c_interrupts()
    try:
        for r in replicas:
            r.start(cfg)
            log.info("replica %d: pid %d on %s%s", r.index, r.proc.pid, r.url,
                     f" (GPU {r.env['CUDA_VISIBLE_DEVICES']})" if "CUDA_VISIBLE_DEVICES" in r.env
                     else f" (CPU cores {r.cores}, {r.env['OMP_NUM_THREADS']} threads)")
        name = None
        for r in replicas:  # every replica loaded: the gateway registers a worker once, with its model name
            while (body := health(r.url + "/health")) is None:
                if r.proc.poll() is not None:
                    log.error("cannot serve: replica %d exited with status %s while loading (its log is above)",
                              r.index, r.proc.returncode)
                    return 1
                time.sleep(POLL_S)
            name = (body.get("model") or {}).get("name")
        env = dict(os.environ, LLADA_XP_API_KEY=sc.api_key or "")
        gateway_port = _free_port_on("127.0.0.1")
        gateway = subprocess.Popen(gateway_command(sc, gateway_port, sc.host, metrics_port, [r.url for r in replicas]),
                                   env=env, preexec_fn=_die_with_parent, start_new_session=True)
        front = subprocess.Popen(front_command(sc, sc.host, port, gateway_port, name), env=env,
                                 preexec_fn=_die_with_parent, start_new_session=True)
        url = f"http://{sc.host}:{port}"
        if not _wait_gateway(f"http://{_reachable(sc.host)}:{port}", name, sc.api_key,
                             lambda: gateway.poll() is None and front.poll() is None):
            log.error("cannot serve: the gateway or its front did not start on %s (status %s, %s; the log is above)",
                      url, gateway.poll(), front.poll())
            return 1
        log.info("serving %s on %s (docs: each replica's /docs): %d replicas behind the sglang-router gateway "
                 "(policy %s, %s); gateway metrics on http://%s:%d/metrics, each replica's on its own /metrics",
                 name, url, len(replicas), sc.policy, "Bearer key required" if sc.api_key else "no API key",
                 sc.host, metrics_port)
        alive = list(replicas)
        while True:
            for what, proc in (("gateway", gateway), ("front", front)):
                if proc.poll() is not None:
                    log.error("the %s exited with status %s; stopping the replicas", what, proc.returncode)
                    return 1
            for r in [r for r in alive if r.proc.poll() is not None]:
                alive.remove(r)
                log.error("replica %d (pid %d, %s) exited with status %s; left out: the gateway stops routing to "
                          "it, %d replica(s) keep serving", r.index, r.proc.pid, r.url, r.proc.returncode, len(alive))
            if not alive:
                log.error("no replica is left; stopping the gateway")
                return 1
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        log.info("stopping the gateway and %d replicas", len(replicas))
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        _stop([front, gateway])  # first: no new request reaches a stopping replica
        _stop([r.proc for r in replicas])


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _ctrl_c_interrupts():
    """Make SIGINT raise KeyboardInterrupt, also when this process started with it ignored (a script's `serve.py &`:
    the shell ignores SIGINT for background commands, so Python installs no handler and Ctrl-C or `kill -INT`
    would leave the job or the replicas running). The previous handler, for restoring."""
    return signal.signal(signal.SIGINT, signal.default_int_handler)


def _reachable(host: str) -> str:
    """An address this machine reaches a server bound to `host` on (0.0.0.0 / :: → loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _wait_file(path: Path) -> str:
    while not path.exists():
        time.sleep(POLL_S)
    return path.read_text()


def replica_task(cfg: ServeConfig, rank: int, local_rank: int, tasks: int, job_id: str, folder: Path) -> None:
    """One SLURM task of launcher.replicas=N: serve one replica (one GPU); task 0 also runs the gateway.

    Tasks meet through the job folder: each writes replica_<rank>.json (node, port); task 0 waits for all N and
    their /health, starts the gateway on the node's server.port (or a free port), then writes server_info.json."""
    from llada_xp.server import serve

    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if len(visible) > 1:  # sites differ in GPU binding: take this task's own GPU of the node's (before torch loads)
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[local_rank % len(visible)]
    key = api_key(cfg.server)
    if rank == 0:
        key = key or secrets.token_urlsafe(32)
        write_private(folder / (KEY_FILE + ".tmp"), key + "\n")
        (folder / (KEY_FILE + ".tmp")).replace(folder / KEY_FILE)
    elif key is None:
        key = _wait_file(folder / KEY_FILE).strip()
    node, public_port = advertised_host(), cfg.server.port
    cfg.server.host, cfg.server.port, cfg.server.api_key = "0.0.0.0", _free_port(), key
    _write_json(folder / f"replica_{rank}.json", {"rank": rank, "node": node, "port": cfg.server.port,
                                                  "url": f"http://{node}:{cfg.server.port}",
                                                  "metrics_url": f"http://{node}:{cfg.server.port}/metrics"})
    log.info("job %s task %d: replica on http://%s:%d%s", job_id, rank, node, cfg.server.port,
             f" (GPU {os.environ['CUDA_VISIBLE_DEVICES']})" if visible else "")
    gateway: list[subprocess.Popen] = []
    if rank == 0:
        threading.Thread(target=_front, args=(cfg, tasks, job_id, folder, node, public_port, gateway),
                         name="llada-xp-gateway", daemon=True).start()
    try:
        serve(cfg)
    finally:
        _stop(gateway)


def _front(cfg: ServeConfig, tasks: int, job_id: str, folder: Path, node: str, port: int,
           gateway: list[subprocess.Popen]) -> None:
    """Task 0's thread: wait for every replica, start the gateway, write server_info.json (then the submitter
    prints the connection block)."""
    sc = cfg.server
    replicas = [json.loads(_wait_file(folder / f"replica_{i}.json")) for i in range(tasks)]
    name = None
    for r in replicas:
        while (body := health(r["url"] + "/health")) is None:
            time.sleep(POLL_S)
        name = (body.get("model") or {}).get("name")
    port, metrics_port, gateway_port = port or _free_port(), sc.metrics_port or _free_port(), _free_port()
    env = dict(os.environ, LLADA_XP_API_KEY=sc.api_key)
    workers = [r["url"] for r in replicas]
    gateway.append(subprocess.Popen(gateway_command(sc, gateway_port, "0.0.0.0", metrics_port, workers), env=env,
                                    preexec_fn=_die_with_parent))
    gateway.append(subprocess.Popen(front_command(sc, "0.0.0.0", port, gateway_port, name), env=env,
                                    preexec_fn=_die_with_parent))
    if not _wait_gateway(f"http://{node}:{port}", name, sc.api_key, lambda: all(p.poll() is None for p in gateway),
                         timeout=600):
        log.error("the gateway or its front did not start on %s:%d (status %s)", node, port,
                  [p.poll() for p in gateway])
        return
    url = f"http://{node}:{port}"
    info = {"job_id": job_id, "node": node, "port": port, "url": url, "base_url": url + "/v1",
            "health_url": url + "/health", "key_file": str(folder / KEY_FILE), "model": name,
            "policy": sc.policy, "metrics_url": f"http://{node}:{metrics_port}/metrics", "replicas": replicas}
    _write_json(folder / INFO_FILE, info)
    log.info("job %s: gateway on %s in front of %d replicas (API key in %s)", job_id, url, tasks, info["key_file"])
    # stay: the gateway's PR_SET_PDEATHSIG fires when the *thread* that started it ends
    while all(p.poll() is None for p in gateway):
        time.sleep(POLL_S)
    log.error("the gateway or its front exited (status %s)", [p.poll() for p in gateway])


# ------------------------------------------------------------------------------------------------ child processes
def _replica_main(index: str) -> int:
    """`python -m llada_xp.launch replica I`: serve the pickled ServeConfig read from stdin."""
    import pickle

    from uvicorn.config import LOGGING_CONFIG

    from llada_xp.loading import ModelLoadError
    from llada_xp.server import serve

    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s][replica {index}][%(name)s][%(levelname)s] - "
                                                   "%(message)s")
    for formatter in LOGGING_CONFIG["formatters"].values():  # uvicorn's own lines too: N replicas, one terminal
        formatter["fmt"] = f"[replica {index}] " + formatter["fmt"]
    cfg = pickle.load(sys.stdin.buffer)
    try:
        serve(cfg)
    except (ModelLoadError, ValueError, OSError) as e:
        log.error("replica %s cannot serve: %s", index, e)
        return 1
    return 0


def _gateway_main(argv: list[str]) -> int:
    """`python -m llada_xp.launch gateway FLAGS`: sglang-router with the API key from $LLADA_XP_API_KEY."""
    from sglang_router.launch_router import launch_router, parse_router_args

    args = parse_router_args(argv)
    args.api_key = os.environ.pop("LLADA_XP_API_KEY", "") or None
    launch_router(args)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["replica"]:
        sys.exit(_replica_main(sys.argv[2]))
    if sys.argv[1:2] == ["gateway"]:
        sys.exit(_gateway_main(sys.argv[2:]))
    if sys.argv[1:2] == ["front"] and len(sys.argv) == 7:
        from llada_xp.front import run

        run(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6] or None,
            os.environ.get("LLADA_XP_API_KEY") or None)
        sys.exit(0)
    sys.exit("usage: python -m llada_xp.launch replica INDEX | gateway SGLANG_ROUTER_FLAGS | front HOST PORT "
             "GATEWAY_URL LOG_LEVEL MODEL (started by serve.py; the key in $LLADA_XP_API_KEY)")
