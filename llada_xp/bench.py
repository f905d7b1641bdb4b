"""Benchmarks (CLI).

    python -m llada_xp.bench server [--concurrency 1,4,16] [--model demo|PATH] [--url URL] [--replicas 1,2]
                                    [--policy round_robin,power_of_two] [overrides]
    python -m llada_xp.bench step [--model demo|llada-8b|PATH] [--layers N] [--scale K] [--baseline REV]
                                  [--no-compile]
    python -m llada_xp.bench sampler [--model demo|llada-8b-random|PATH] [--batch N] [--gen-length N]
    python -m llada_xp.bench scheduler [--model demo|PATH] [--max-batch-size 8]

`scheduler`: the engine's two schedulers (server.scheduler=static | continuous) side by side, in-process (the engine
without HTTP): (a) head-of-line blocking: one long request (gen 512, quota, steps 512) while short ones (gen 32)
arrive every 100 ms — the short ones' latency; (b) an open-loop mixed load (Poisson arrivals, gen 32-256, tau 0.9) —
tokens/s and latency; (c) the evaluation of the demo task at gen_length 256 fed batch after batch vs continuously —
forwards per answer and wall time.

`server`: starts the server (serve() in a child process; config composed from conf/serve.yaml plus Hydra overrides,
and model.threads=1 and a free server.port unless they are among them) unless --url names a running one, then drives
it with N concurrent clients sending demo-task chat requests (held-out prompts), and prints throughput and latency
percentiles per concurrency level. Every level sends the same prompts. It speaks only HTTP to the server; beforehand
(--ceiling, on by default when it starts the server) it times the Sampler alone on the same model, settings and
prompts in batches of each level's size, which shows how much batching can give on this device at all.
--replicas 1,2 runs the same levels against serve.py server.replicas=1, then =2 (the gateway in front), and prints
aggregate tokens/s relative to the first count and p99 latency. --policy A,B runs every count above 1 once per
gateway policy (server.policy), in the order given (repeat one, e.g. A,B,B,A, to see the drift of a noisy machine).

`step`: what one decoding step costs the host (issue 17): ATen ops per forward (torch.profiler), host syncs per
sampler step, ms per dual-cache block step and block-start forward, eager vs compiled, and with --baseline REV the
same weights in that revision's model.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("llada_xp.bench")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


# ------------------------------------------------------------------------------------------------ server
def compose_serve_config(overrides: list[str]):
    """conf/serve.yaml + overrides → ServeConfig (as serve.py would build it)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from llada_xp.config import register

    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose("serve", overrides=overrides))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_child() -> None:
    """Entry of the server child process: argv = overrides (model.threads applies when the model loads)."""
    from llada_xp.server import serve

    logging.basicConfig(level=logging.WARNING)
    serve(compose_serve_config(sys.argv[1:]))


def _prompts(n: int) -> list[str]:
    from llada_xp.demo.task import HELD_OUT_SEED, examples

    return [e.prompt for e in examples(n, HELD_OUT_SEED)]


def _wait_ready(http, proc: Optional[subprocess.Popen], timeout: float = 300.0) -> dict:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before it was ready")
        try:
            r = http.get("/health")
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready in time")


def _level(url: str, prompts: list[str], concurrency: int, body: dict) -> dict:
    """Send `prompts` through `concurrency` client threads; per-request latency and completion tokens."""
    import httpx

    todo = iter(prompts)
    lock = threading.Lock()
    latencies, tokens, errors = [], [], []

    def client():
        with httpx.Client(base_url=url, timeout=600) as h:
            while True:
                with lock:
                    prompt = next(todo, None)
                if prompt is None:
                    return
                t = time.perf_counter()
                r = h.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": prompt}]})
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        tokens.append(r.json()["usage"]["completion_tokens"])
                    else:
                        errors.append(f"{r.status_code}: {r.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        log.warning("%d failed requests at concurrency %d, e.g. %s", len(errors), concurrency, errors[0])
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors), "tokens": sum(tokens),
            "wall_s": wall, "tok_s": sum(tokens) / wall, "req_s": len(latencies) / wall,
            "p50": q[49], "p90": q[89], "p99": q[98]}


def sampler_ceiling(cfg, prompts: list[str], levels: list[int], body: dict) -> dict[int, float]:
    """tokens/s of the Sampler alone (no HTTP, no engine) on the server's model, settings and prompts, decoding the
    prompts in batches of each level's size: the most a server batching that many requests can reach on this device."""
    from llada_xp.loading import load_model
    from llada_xp.protocol import ChatCompletionRequest
    from llada_xp.sampler import Request, Sampler

    loaded = load_model(cfg.model)  # sets model.threads, as in the server
    sampler = Sampler(loaded.model, loaded.info.ids, decode=loaded.tokenizer.decode)
    reqs = []
    for text in prompts:
        chat = ChatCompletionRequest(**body, messages=[{"role": "user", "content": text}])
        reqs.append((chat.prompt_ids(loaded.tokenizer), chat.settings(cfg.sampler)[0]))
    out = {}
    for c in levels:
        sampler.generate([Request(p, st) for p, st in reqs[:c]])  # warm-up
        t, tokens = time.perf_counter(), 0
        for i in range(0, len(reqs), c):
            tokens += sum(len(r.tokens) for r in sampler.generate([Request(p, st) for p, st in reqs[i:i + c]]))
        out[c] = tokens / (time.perf_counter() - t)
    return out


def bench_server(args: argparse.Namespace) -> int:
    counts = [int(n) for n in args.replicas.split(",")]
    if args.policy is not None and not any(n > 1 for n in counts):
        raise SystemExit("--policy picks the gateway's policy: it needs --replicas with a count above 1")
    if args.policy is not None and any(o.split("=")[0].lstrip("+~") == "server.policy" for o in args.overrides):
        raise SystemExit("give the policies either as --policy or as the server.policy override, not both")
    if counts == [1]:
        return _bench_one(args)
    if args.url is not None:
        raise SystemExit("--replicas starts the servers it compares; it cannot bench --url")
    return bench_replicas(args, counts)


def bench_replicas(args: argparse.Namespace, counts: list[int]) -> int:
    """The same levels against serve.py server.replicas=N for each N (the gateway in front when N > 1; once per
    --policy), one after the other on this machine; then aggregate tokens/s relative to the first run, and p99."""
    import tempfile

    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = _prompts(max(args.requests, max(levels) * args.rounds))
    model = ["model=demo"] if args.model == "demo" else ["model=hf", f"model.path={args.model}"]
    policies = args.policy.split(",") if args.policy else [None]
    runs = [(n, p if n > 1 else None) for n in counts for p in (policies if n > 1 else [None])]
    results, failed = [], False
    for n, policy in runs:
        port = _free_port()
        with tempfile.TemporaryDirectory() as run_dir:
            proc = subprocess.Popen([sys.executable, str(CONF_DIR.parent / "serve.py"), *model,
                                     f"server.port={port}", f"server.replicas={n}", "server.log_level=warning",
                                     f"hydra.run.dir={run_dir}", *([f"server.policy={policy}"] if policy else []),
                                     *args.overrides], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            try:
                name = _wait_models(url, proc)
                body = {"model": name, "max_tokens": args.max_tokens, "temperature": 0.0}
                _level(url, prompts[:max(levels)], max(levels), body)  # warm-up
                results.append([_level(url, prompts[:max(args.requests, c * args.rounds)], c, body) for c in levels])
                failed |= any(r["errors"] for r in results[-1])
                log.info("%d replica(s)%s done", n, f", policy {policy}" if policy else "")
            finally:
                proc.send_signal(signal.SIGINT)  # serve.py stops its replicas and the gateway
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"replica bench: model {args.model}, {os.cpu_count()} CPUs here, max_tokens {args.max_tokens}, "
          f"temperature 0, policy {'from the config' if args.policy is None else 'per row'}; "
          f"overrides: {' '.join(args.overrides)}")
    print(f"{'replicas':>8} {'policy':>12} {'conc':>5} {'reqs':>5} {'tok/s':>8} {'req/s':>7} {'p50 s':>7} "
          f"{'p99 s':>7} {'× 1st run':>9}")
    for (n, policy), rows in zip(runs, results):
        for r, b in zip(rows, results[0]):
            print(f"{n:>8} {policy or '-':>12} {r['concurrency']:>5} {r['requests']:>5} {r['tok_s']:>8.1f} "
                  f"{r['req_s']:>7.2f} {r['p50']:>7.3f} {r['p99']:>7.3f} {r['tok_s'] / b['tok_s']:>9.2f}")
    return 1 if failed else 0


def _wait_models(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> str:
    """The served model's name once /v1/models answers (through the gateway: once its replicas are registered)."""
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"serve.py exited with status {proc.returncode} before it was ready")
        try:
            r = httpx.get(url + "/v1/models", timeout=5)
            if r.status_code == 200 and r.json().get("data"):
                return r.json()["data"][0]["id"]
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready in time")


def _bench_one(args: argparse.Namespace) -> int:
    import httpx

    levels = [int(c) for c in args.concurrency.split(",")]
    overrides = list(args.overrides)
    if args.url is not None and overrides:
        raise SystemExit(f"overrides ({' '.join(overrides)}) configure the server the bench starts; with --url the "
                         f"server is already running")
    body = {"max_tokens": args.max_tokens, "temperature": 0.0}
    prompts = _prompts(max(args.requests, max(levels) * args.rounds))
    proc, url, ceiling, cfg = None, args.url, {}, None
    if url is None:
        model = ["model=demo"] if args.model == "demo" else ["model=hf", f"model.path={args.model}"]
        # defaults first: the user's overrides win (Hydra applies the last of repeated keys)
        overrides = model + ["model.threads=1", f"server.port={_free_port()}", "server.log_level=warning"] + overrides
        cfg = compose_serve_config(overrides)  # fail here, not in the child, on a bad override
        host = "127.0.0.1" if cfg.server.host in ("0.0.0.0", "::") else cfg.server.host
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                sock.bind((host, cfg.server.port))
            except OSError as e:
                raise SystemExit(f"cannot serve on server.host={cfg.server.host} server.port={cfg.server.port}: {e} "
                                 f"(leave server.port out and the bench picks a free port)") from None
        if args.ceiling:  # before the server starts: the two never share the CPU
            ceiling = sampler_ceiling(cfg, prompts[:max(args.requests, max(levels))], levels, body)
        proc = subprocess.Popen([sys.executable, "-c", "from llada_xp.bench import _serve_child; _serve_child()",
                                 *overrides])
        url = f"http://{f'[{host}]' if ':' in host else host}:{cfg.server.port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            health = _wait_ready(http, proc)
        _level(url, prompts[:max(levels)], max(levels), body)  # warm-up
        rows = []
        for c in levels:
            n = max(args.requests, c * args.rounds)
            rows.append(_level(url, prompts[:n], c, body))
            log.info("concurrency %d done: %.1f tok/s", c, rows[-1]["tok_s"])
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    model = health.get("model", {})
    # the server's torch threads as /health reports them, else as configured here; an external server's are its own
    if health.get("threads"):
        threads = f"{health['threads']} torch threads"
    elif cfg is not None:
        threads = f"{cfg.model.threads} torch threads" if cfg.model.threads else "model.threads=null (auto)"
    else:
        threads = "torch threads not reported"
    where = f"external server {url}" if cfg is None else f"server started here at {url}"
    print(f"server bench: model {model.get('name')} ({model.get('parameters', 0) / 1e6:.2f}M parameters, "
          f"{model.get('dtype')}) on {health.get('device')}, {where}, {threads}; max_batch_size "
          f"{health.get('max_batch_size', '?')}; bench client: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; max_tokens {args.max_tokens}, temperature 0; overrides: {' '.join(overrides)}")
    head = f"{'conc':>5} {'reqs':>5} {'tokens':>7} {'wall s':>8} {'tok/s':>8} {'req/s':>7} {'p50 s':>7} " \
           f"{'p90 s':>7} {'p99 s':>7} {'× c=1':>6}"
    if ceiling:
        head += f" {'sampler tok/s':>13} {'× c=1':>6}"
    print(head)
    base = rows[0]["tok_s"] if rows and rows[0]["concurrency"] == 1 else None
    for r in rows:
        ratio = f"{r['tok_s'] / base:6.2f}" if base else f"{'-':>6}"
        line = f"{r['concurrency']:>5} {r['requests']:>5} {r['tokens']:>7} {r['wall_s']:>8.2f} {r['tok_s']:>8.1f} " \
               f"{r['req_s']:>7.2f} {r['p50']:>7.3f} {r['p90']:>7.3f} {r['p99']:>7.3f} {ratio}"
        if ceiling:
            c = ceiling[r["concurrency"]]
            line += f" {c:>13.1f} {c / ceiling[1]:6.2f}" if 1 in ceiling else f" {c:>13.1f} {'-':>6}"
        print(line)
    if ceiling:
        print("sampler tok/s: the Sampler alone (no HTTP, no engine) decoding the same prompts in batches of the "
              "level's size — the most batching can give on this device")
    return 1 if any(r["errors"] for r in rows) else 0


# ------------------------------------------------------------------------------------------------ sampler
MODES = {  # name: sampler settings over the base (reference presets of sampling.md)
    "llada (no cache, quota)": dict(cache="none", threshold=None, factor=None),
    "prefix cache, quota": dict(cache="prefix", threshold=None, factor=None),
    "dual cache, quota": dict(cache="dual", threshold=None, factor=None),
    "no cache, tau 0.9": dict(cache="none", threshold=0.9),
    "prefix cache, tau 0.9": dict(cache="prefix", threshold=0.9),
    "dual cache, tau 0.9": dict(cache="dual", threshold=0.9),
    "dual cache, factor 1.0": dict(cache="dual", threshold=None, factor=1.0),
}


def _bench_model(args):
    """(model, ids, prompts) for the sampler benchmark."""
    import torch

    from llada_xp.config import ModelConfig
    from llada_xp.loading import load_model, pick_device, pick_dtype
    from llada_xp.model import PRESETS, LLaDAConfig, LLaDAModelLM
    from llada_xp.sampler import SpecialIds

    if args.model == "llada-8b-random":  # LLaDA-8B shapes, random weights: speed only (confidences are flat)
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        config = LLaDAConfig(**PRESETS["llada-8b"])
        with torch.device(device):
            torch.manual_seed(0)
            model = LLaDAModelLM(config).to(dtype).eval()
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 126000, (args.prompt_length,), generator=g).tolist() for _ in range(args.batch)]
        ids = SpecialIds(mask=config.mask_token_id, eos=config.eos_token_id, eot=126348, pad=config.pad_token_id)
        return model, ids, prompts, f"LLaDA-8B shapes, random {dtype}"
    from llada_xp.demo.check import prompt_ids
    from llada_xp.demo.task import HELD_OUT_SEED, examples

    cfg = ModelConfig(source="demo") if args.model == "demo" else ModelConfig(source="hf", path=args.model)
    cfg.device, cfg.dtype = args.device, args.dtype
    loaded = load_model(cfg)
    prompts = [prompt_ids(loaded.tokenizer, e.prompt) for e in examples(args.batch, HELD_OUT_SEED)]
    return loaded.model, loaded.info.ids, prompts, f"{loaded.info.name} ({loaded.info.dtype})"


def bench_sampler(args) -> int:
    import time

    import torch

    from llada_xp.config import SamplerConfig
    from llada_xp.sampler import Request, Sampler

    model, ids, prompts, what = _bench_model(args)
    device = next(model.parameters()).device
    sampler = Sampler(model, ids, timing=True)  # forward_s: wall time of each forward (syncs on a GPU)
    base = SamplerConfig(gen_length=args.gen_length, block_length=args.block_length, steps=args.gen_length,
                         early_stop=args.early_stop)
    print(f"sampler benchmark: {what} on {device}"
          f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}),"
          f" batch {args.batch}, gen_length {args.gen_length}, block {args.block_length}, early_stop {args.early_stop},"
          f" best of {args.repeats}")
    rows = []
    for name, over in MODES.items():
        st = SamplerConfig(**{**base.__dict__, **over})
        best = None
        for _ in range(args.repeats + 1):  # the first run warms up
            t = time.perf_counter()
            res = sampler.generate([Request(p, st) for p in prompts])
            wall = time.perf_counter() - t
            if best is None or wall < best[0]:
                best = (wall, res)
        wall, res = best
        tokens = sum(len(r.tokens) for r in res)
        nfe = max(r.stats.nfe for r in res)
        fwd = max(r.stats.forward_s for r in res)
        committed = sum(r.stats.committed for r in res) / len(res)
        rows.append((name, nfe, tokens / wall, committed / nfe, 1 - fwd / wall, wall))
    base_tps = rows[0][2]
    print("| mode | NFE | tokens/s | tokens/forward | outside forwards | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, nfe, tps, tpf, outside, wall in rows:
        print(f"| {name} | {nfe} | {tps:.1f} | {tpf:.2f} | {outside:.1%} | {tps / base_tps:.2f}x |")
    return 0


# ------------------------------------------------------------------------------------------------ step
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::is_nonzero")  # device → host waits


def _step_model(args):
    """(model, ids, prompts, description) for the step bench: the demo, or LLaDA-8B shapes with random weights
    (--layers fewer layers, --scale K: d_model, heads and MLP width / K, head_dim 128, LLaDA's vocabulary)."""
    import torch

    from llada_xp.loading import pick_device, pick_dtype
    from llada_xp.model import PRESETS, LLaDAConfig, LLaDAModelLM
    from llada_xp.sampler import SpecialIds

    if args.model != "llada-8b":
        model, ids, prompts, what = _bench_model(args)
        return model.fuse(), ids, prompts, what
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    p, k = dict(PRESETS["llada-8b"]), args.scale
    p.update(d_model=4096 // k, n_heads=32 // k, n_kv_heads=32 // k, mlp_hidden_size=12288 // k,
             n_layers=args.layers or 32)
    config = LLaDAConfig(**p)
    with torch.device(device):
        torch.manual_seed(0)
        model = LLaDAModelLM(config).to(dtype).eval().fuse()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 126000, (args.prompt_length,), generator=g).tolist() for _ in range(args.batch)]
    ids = SpecialIds(mask=config.mask_token_id, eos=config.eos_token_id, eot=126348, pad=config.pad_token_id)
    shape = f"d_model {config.d_model}, {config.n_layers} layers, vocabulary {config.vocab_size}"
    return model, ids, prompts, f"LLaDA-8B shapes / {k} ({shape}), random {str(dtype).removeprefix('torch.')}"


def _baseline_model(rev: str, model):
    """The same weights in llada_xp/model.py as of git revision `rev` (before/after in one run)."""
    import importlib.util
    import tempfile

    out = subprocess.run(["git", "show", f"{rev}:llada_xp/model.py"], cwd=CONF_DIR.parent, capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"--baseline {rev}: {out.stderr.strip()}")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(out.stdout)
    spec = importlib.util.spec_from_file_location(f"llada_xp_model_{rev}", f.name)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    finally:
        os.unlink(f.name)
    p = next(model.parameters())
    fields = model.config.to_dict()
    with p.device:
        old = mod.LLaDAModelLM(mod.LLaDAConfig(**fields)).to(p.dtype).eval()
    old.load_state_dict(model.state_dict())  # checkpoint names both ways
    return old


def _ops(fn) -> tuple[int, int]:
    """(top-level ATen ops, all ATen ops including nested ones) that fn() dispatches, by torch's profiler (CPU side)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ev = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in ev if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(top), len(ev)


def _best_ms(fn, repeats: int) -> float:
    import torch

    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _forwards(model, B: int, L: int, s: int, bl: int, device):
    """(block-start forward, dual-cache block step) on a canvas of L columns, block [s, s + bl)."""
    import torch

    x = torch.randint(0, model.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(1)).to(device)

    def start():
        model.setup_cache(B, L)
        return model(x, use_cache=True, logits_slice=slice(s, s + bl)).logits

    def step():
        return model(x[:, s:s + bl], start=s, use_cache=True).logits

    return start, step


def count_syncs(fn, device) -> int:
    """Host synchronisations while fn() runs: item()/bool()/nonzero()/boolean-mask indexing (profiler), tolist() and
    cuda.synchronize() (counted calls), and on CUDA whatever torch.cuda.set_sync_debug_mode reports."""
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile

    calls = [0]
    tolist, cuda_sync = torch.Tensor.tolist, torch.cuda.synchronize

    def counted(f):
        def g(*a, **k):
            calls[0] += 1
            return f(*a, **k)
        return g

    torch.Tensor.tolist, torch.cuda.synchronize = counted(tolist), counted(cuda_sync)
    try:
        with warnings.catch_warnings(record=True) as caught, profile(activities=[ProfilerActivity.CPU]) as prof:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            fn()
    finally:
        torch.Tensor.tolist, torch.cuda.synchronize = tolist, cuda_sync
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    ops = sum(1 for e in prof.events() if e.name in SYNC_OPS and
              (e.cpu_parent is None or e.cpu_parent.name not in SYNC_OPS))
    if device.type == "cuda":  # the debug mode sees every sync, tolist and synchronize included
        return sum(1 for w in caught if "synchroniz" in str(w.message))
    return ops + calls[0]


def bench_step(args) -> int:
    """ATen ops per forward, host syncs per step, ms per block step and block-start forward; eager vs compiled;
    --baseline REV: the same weights in that revision's model.py, side by side."""
    import torch

    from llada_xp.config import SamplerConfig
    from llada_xp.sampler import Request, Sampler

    model, ids, prompts, what = _step_model(args)
    device = next(model.parameters()).device
    B, bl = len(prompts), args.block_length
    P = max(len(p) for p in prompts)
    L, s = P + args.gen_length, P
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"step bench: {what} on {device} ({where}), batch {B}, canvas {L} (prompt {P} + gen {args.gen_length}), "
          f"block {bl}, best of {args.repeats}")
    variants = [("after (fused, shared RoPE)", model, False)]
    if args.baseline:
        variants.insert(0, (f"before ({args.baseline})", _baseline_model(args.baseline, model), False))
    if args.compile:
        variants.append(("after, compiled block step", model, True))
    rows = []
    with torch.inference_mode():
        for name, m, compiled in variants:
            start, step = _forwards(m, B, L, s, bl, device)
            start()
            if compiled:
                t = time.perf_counter()
                if not m.compile_block_step():
                    continue
                step()  # compiles
                log.info("compiled the block step in %.1f s", time.perf_counter() - t)
            top_start, all_start = _ops(start)
            top_step, all_step = _ops(step)
            rows.append((name, top_start, all_start, top_step, all_step, _best_ms(start, args.repeats),
                         _best_ms(step, args.repeats)))
            if hasattr(m, "clear_cache"):
                m.clear_cache()
        model._cached_step = None
        st = SamplerConfig(gen_length=args.gen_length, block_length=bl, steps=args.gen_length, cache="dual",
                           threshold=0.9, temperature=0.0, early_stop=False)
        sampler = Sampler(model, ids)
        reqs = [Request(p, st) for p in prompts]
        sampler.generate(reqs)  # warm-up
        res = []
        syncs = count_syncs(lambda: res.extend(sampler.generate(reqs)), device)
        nfe = max(r.stats.nfe for r in res)
        ms_sampler = _best_ms(lambda: sampler.generate(reqs), args.repeats) / nfe
    print("| model code | ATen ops, block-start forward | ATen ops, block step | ms block-start forward | "
          "ms block step |")
    print("|---|---:|---:|---:|---:|")
    for name, ts, as_, tp, ap, ms_start, ms_step in rows:
        print(f"| {name} | {ts:,} ({as_:,} nested) | {tp:,} ({ap:,} nested) | {ms_start:.1f} | {ms_step:.1f} |")
    print(f"host syncs per step (sampler, dual cache, threshold 0.9, temperature 0): {syncs / nfe:.1f} "
          f"({syncs} in {nfe} forwards); {ms_sampler:.1f} ms per sampler step (forward + commit, best of "
          f"{args.repeats})")
    print("ATen ops: top-level dispatches per forward (nested: every ATen call underneath as well), torch.profiler "
          "on the host")
    return 0


# ------------------------------------------------------------------------------------------------ scheduler
def _pct(xs: list[float], q: int) -> float:
    """Nearest-rank percentile."""
    import math

    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)] if xs else float("nan")


def _drive(sampler, scheduler: str, max_batch: int, arrivals: list[tuple[float, list[int], object]],
           join_wait_steps: int = 4) -> list[dict]:
    """Submit (time, prompt, settings) at their times to a fresh Engine; per request: latency, tokens, nfe."""
    import asyncio

    from llada_xp.engine import Engine, Failed
    from llada_xp.sampler import Finished, Request

    async def main():
        eng = Engine(sampler, max_batch_size=max_batch, max_queue=10_000, batch_window_s=0,
                     scheduler=scheduler, join_wait_steps=join_wait_steps).start()
        t0 = time.perf_counter()

        async def one(at, prompt, st):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            sent = time.perf_counter()
            job = eng.submit([Request(list(prompt), st)], tokens=False)
            while True:
                _, ev = await job.events.get()
                if isinstance(ev, Failed):
                    raise ev.error
                if isinstance(ev, Finished):
                    done = time.perf_counter()
                    return dict(latency=done - sent, end=done - t0, start=sent - t0, tokens=len(ev.result.tokens),
                                nfe=ev.result.stats.nfe)
        try:
            return await asyncio.gather(*(one(*a) for a in arrivals))
        finally:
            eng.stop()

    return asyncio.run(main())


def bench_scheduler(args) -> int:
    import random
    from dataclasses import replace

    import torch

    from llada_xp import evaluate, tasks
    from llada_xp.config import ModelConfig, SamplerConfig, TaskConfig
    from llada_xp.demo.check import prompt_ids
    from llada_xp.demo.task import HELD_OUT_SEED, examples
    from llada_xp.loading import load_model
    from llada_xp.sampler import Request, Sampler

    cfg = ModelConfig(source="demo") if args.model == "demo" else ModelConfig(source="hf", path=args.model)
    cfg.threads = args.threads
    loaded = load_model(cfg)
    model, tok = loaded.model, loaded.tokenizer
    trained = model.config.max_sequence_length
    if args.max_length > trained:  # RoPE has no table: longer canvases run (speed figures; answers past the training
        model.config.max_sequence_length = args.max_length  # length are not meant to be good)
    prompts = [prompt_ids(tok, e.prompt) for e in examples(max(args.requests, 64), HELD_OUT_SEED)]
    base = SamplerConfig()  # sampler=fast: dual cache, tau 0.9, early stop
    rng = random.Random(args.seed)
    long = replace(base, gen_length=args.long_gen, steps=args.long_gen, threshold=None, early_stop=False)
    short = replace(base, gen_length=32, steps=32)
    hol = [(0.0, prompts[0], long)] + [(0.05 + k * args.interval, prompts[1 + k], short) for k in range(args.shorts)]
    t, mixed = 0.0, []
    for k in range(args.requests):
        t += rng.expovariate(args.rate)
        g = rng.choice([32, 64, 128, 256])
        mixed.append((t, prompts[k % len(prompts)], replace(base, gen_length=g, steps=g, threshold=0.9)))
    device = next(model.parameters()).device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, " \
        f"{torch.get_num_threads()} torch threads"
    print(f"scheduler bench: {loaded.info.name} ({loaded.info.dtype}) on {device} ({where}); max_batch_size "
          f"{args.max_batch_size}; join_wait_steps {args.join_wait_steps}; max length "
          f"{model.config.max_sequence_length}"
          f" (trained: {trained})")
    rows: dict[str, dict] = {"static": {}, "continuous": {}}
    sampler = Sampler(model, loaded.info.ids, decode=tok.decode)
    _drive(sampler, "continuous", args.max_batch_size, hol[:3])  # warm-up
    for sched in ("static", "continuous"):  # each part for both schedulers back to back: a shared machine drifts
        a = _drive(sampler, sched, args.max_batch_size, hol, args.join_wait_steps)
        lat = [r["latency"] for r in a[1:]]
        rows[sched].update(a50=_pct(lat, 50), a99=_pct(lat, 99), along=a[0]["latency"])
    for sched in ("static", "continuous"):
        b = _drive(sampler, sched, args.max_batch_size, mixed, args.join_wait_steps)
        span = max(r["end"] for r in b) - min(r["start"] for r in b)
        rows[sched].update(tps=sum(r["tokens"] for r in b) / span, b50=_pct([r["latency"] for r in b], 50),
                           b99=_pct([r["latency"] for r in b], 99))
    log.info("done (a) and (b)")
    task = tasks.load(TaskConfig(name="demo", limit=args.eval_limit))
    ids = [task.prompt_ids(ex, tok) for ex in task.examples]
    st = replace(base, gen_length=args.eval_gen_length, steps=args.eval_gen_length)
    batches = evaluate.shard_batches(ids, args.eval_batch_size, 0, 1)
    for how in ("static", "continuous"):
        sampler = Sampler(model, loaded.info.ids, decode=tok.decode)
        out: dict[int, tuple] = {}
        t0 = time.perf_counter()
        sampler.feed({i: Request(ids[i], st) for i in range(len(ids))}, batches,
                     args.eval_batch_size, how, lambda i, res, run, s, f: out.__setitem__(i, (res, run, f)))
        wall = time.perf_counter() - t0
        forwards = sum(max(f for _, r, f in out.values() if r == run) for run in {r for _, r, _ in out.values()})
        correct = sum(task.score(tok.decode(res.tokens, skip_special_tokens=True), task.examples[i].reference)
                      for i, (res, _, _) in out.items())
        rows[how].update(fwd=forwards / len(out), wall=wall, acc=correct / len(out))
    s_, c_ = rows["static"], rows["continuous"]
    print(f"(a) head-of-line: 1 request gen {args.long_gen} quota steps {args.long_gen} (early stop off) + "
          f"{args.shorts} requests gen 32 "
          f"(tau 0.9) every {args.interval * 1000:.0f} ms")
    print(f"(b) Poisson load: {args.requests} requests at {args.rate}/s, gen 32/64/128/256, tau 0.9, early stop")
    print(f"(c) eval: demo task, {len(ids)} examples, gen_length {args.eval_gen_length}, tau 0.9, early stop, "
          f"batch_size {args.eval_batch_size}" + (f" (beyond the model's own max length, {trained}: "
                                                 f"its answers are not meaningful)" if args.eval_gen_length +
                                                 max(map(len, ids)) > trained else ""))
    print("| | static | continuous | ratio |")
    print("|---|---:|---:|---:|")
    for name, key, fmt, better in [("(a) short p50 latency, s", "a50", ".3f", "lower"),
                                   ("(a) short p99 latency, s", "a99", ".3f", "lower"),
                                   ("(a) long request latency, s", "along", ".3f", "lower"),
                                   ("(b) tokens/s", "tps", ".1f", "higher"),
                                   ("(b) p50 latency, s", "b50", ".3f", "lower"),
                                   ("(b) p99 latency, s", "b99", ".3f", "lower"),
                                   ("(c) forwards per answer", "fwd", ".2f", "lower"),
                                   ("(c) wall time, s", "wall", ".2f", "lower"),
                                   ("(c) accuracy", "acc", ".3f", "same")]:
        x, y = s_[key], c_[key]
        ratio = (x / y if better == "lower" else y / x) if x and y else float("nan")
        print(f"| {name} | {x:{fmt}} | {y:{fmt}} | {ratio:.2f}x |")
    print("ratio: static / continuous for times and forwards, continuous / static for tokens/s (> 1: continuous "
          "better)")
    return 0


# ------------------------------------------------------------------------------------------------ CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llada_xp.bench", description="llada-xp benchmarks")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("server", help="load-test the OpenAI-compatible server",
                       description="Throughput and latency percentiles per concurrency level.")
    s.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    s.add_argument("--model", default="demo", help="demo, or a local model folder in the LLaDA Hub layout")
    s.add_argument("--url", default=None, help="bench a running server instead of starting one")
    s.add_argument("--replicas", default="1", help="comma-separated server.replicas counts to compare in one run "
                   "(e.g. 1,2: serve.py with the gateway in front when > 1); default 1")
    s.add_argument("--policy", default=None, help="comma-separated gateway policies (server.policy) to compare in "
                   "one run, for every --replicas count above 1 (e.g. round_robin,power_of_two); default: the "
                   "config's")
    s.add_argument("--requests", type=int, default=128, help="at least this many requests per level")
    s.add_argument("--rounds", type=int, default=16, help="at least this many requests per client per level")
    s.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    s.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                   help="first time the Sampler alone (no HTTP) at each level's batch size, for comparison")
    s.add_argument("overrides", nargs="*", help="Hydra overrides for the server it starts, e.g. sampler=llada; "
                   "model.threads=1 unless given (on a shared CPU more threads oversubscribe it; model.threads=null: "
                   "auto), server.port: a free one unless given")
    s.set_defaults(func=bench_server)
    b = sub.add_parser("sampler", help="decoding modes side by side on one model",
                       description="NFE, tokens/s, tokens per forward and the share of time outside model forwards "
                                   "for each cache mode and transfer rule, measured in one run.")
    b.add_argument("--model", default="demo", help="demo | llada-8b-random (LLaDA-8B shapes, random weights; "
                                                   "GPU) | a local model folder")
    b.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    b.add_argument("--gen-length", type=int, default=64)
    b.add_argument("--block-length", type=int, default=32)
    b.add_argument("--prompt-length", type=int, default=128, help="llada-8b-random: prompt tokens")
    b.add_argument("--early-stop", action=argparse.BooleanOptionalAction, default=False,
                   help="stop rows at EOS (off = the references' NFE)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per mode (best kept), after one warm-up")
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", default="auto")
    b.set_defaults(func=bench_sampler)
    t = sub.add_parser("step", help="launch and sync cost of one decoding step",
                       description="ATen ops per forward, host syncs per step, ms per dual-cache block step and per "
                                   "block-start forward; eager vs compiled; --baseline REV runs that revision's "
                                   "model.py with the same weights.")
    t.add_argument("--model", default="demo", help="demo | llada-8b (LLaDA-8B shapes, random weights) | a folder")
    t.add_argument("--layers", type=int, default=None, help="llada-8b: layers (default 32)")
    t.add_argument("--scale", type=int, default=1, help="llada-8b: d_model, heads and MLP width divided by this "
                   "(head_dim stays 128; 16 = a 32-layer model with LLaDA's vocabulary that fits a CPU)")
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--prompt-length", type=int, default=128, help="llada-8b: prompt tokens")
    t.add_argument("--gen-length", type=int, default=64)
    t.add_argument("--block-length", type=int, default=32)
    t.add_argument("--repeats", type=int, default=5, help="timed runs (best kept), after one warm-up")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the compiled block step (model.compile)")
    t.add_argument("--baseline", default=None, help="a git revision whose model.py runs the same weights (before)")
    t.add_argument("--device", default="auto")
    t.add_argument("--dtype", default="auto")
    t.set_defaults(func=bench_step)
    c = sub.add_parser("scheduler", help="static vs continuous batching, in-process",
                       description="Head-of-line latency, a Poisson load and an in-process evaluation with "
                                   "server.scheduler=static and =continuous, in one run.")
    c.add_argument("--model", default="demo", help="demo, or a local model folder in the LLaDA Hub layout")
    c.add_argument("--threads", type=int, default=1, help="torch CPU threads (model.threads)")
    c.add_argument("--max-batch-size", type=int, default=8)
    c.add_argument("--join-wait-steps", type=int, default=4, help="server.join_wait_steps")
    c.add_argument("--max-length", type=int, default=1024,
                   help="raise the model's max_sequence_length to this (the demo's is 256; gen 512 needs more)")
    c.add_argument("--long-gen", type=int, default=512, help="(a) gen_length and steps of the long request")
    c.add_argument("--shorts", type=int, default=20, help="(a) short requests")
    c.add_argument("--interval", type=float, default=0.1, help="(a) seconds between short requests")
    c.add_argument("--requests", type=int, default=200, help="(b) requests")
    c.add_argument("--rate", type=float, default=20.0, help="(b) mean arrivals per second")
    c.add_argument("--seed", type=int, default=0, help="(b) arrival times and gen lengths")
    c.add_argument("--eval-limit", type=int, default=200, help="(c) demo task examples")
    c.add_argument("--eval-batch-size", type=int, default=16, help="(c) batch_size")
    c.add_argument("--eval-gen-length", type=int, default=256, help="(c) gen_length")
    c.set_defaults(func=bench_scheduler)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
