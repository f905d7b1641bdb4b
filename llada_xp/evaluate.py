"""The evaluation loop: a task's prompts through the sampler's running set, scored, logged, resumable, shardable.

Writes into the output dir samples.jsonl (one line per sample, appended as it finishes; a restart on the same dir
continues where it stopped) and metrics.json (accuracy, speed, NFE, latency, torch threads, fingerprint, resolved
config), and logs to W&B when logger=wandb. Shards evaluate disjoint batches (task=lm_eval: documents); `merge` joins
their dirs. Knows nothing about Hydra (eval.py) or sweeps (report.py); never decodes by itself (sampler.py does).

    python -m llada_xp.evaluate merge --out DIR SHARD_DIR [SHARD_DIR ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import netrc
import os
import platform
import socket
import time
import uuid
from collections import deque
from importlib import metadata
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import numpy as np
from tqdm.auto import tqdm

from llada_xp import tasks
from llada_xp.config import EvalConfig, LoggerConfig, check
from llada_xp.loading import load_model
from llada_xp.sampler import Finished, Request, Sampler

log = logging.getLogger(__name__)

SAMPLES, METRICS = "samples.jsonl", "metrics.json"
GENERATIONS = "generations.jsonl"  # task=lm_eval: the sampler's stats of each generation request (the speed figures)
LM_EVAL_CACHE = "lm_eval_cache_"  # task=lm_eval: lm-eval's request cache, + the config key (+ "_rank0.db")
# Sample fields that differ between identical runs (everything else is reproducible)
TIMING_FIELDS = ("latency_s", "forward_s", "batch", "run_s", "run_forwards")
WANDB_MODES = ("online", "offline", "disabled")
PACKAGES = ("llada-xp", "torch", "transformers", "tokenizers", "datasets", "hydra-core", "wandb")


class EvalError(RuntimeError):
    """The evaluation cannot run or resume as configured; the message says why."""


# --------------------------------------------------------------------------------------------------- entry
def evaluate(cfg: EvalConfig, **kw) -> float:
    """Run the evaluation (`run`) and return metrics.json's `cfg.metric` (what eval.py hands to a sweeper)."""
    metrics = run(cfg, **kw)
    if cfg.metric not in metrics or not isinstance(metrics[cfg.metric], (int, float)):
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise EvalError(f"metric={cfg.metric!r} is not a number in metrics.json; choose one of {numeric}")
    return float(metrics[cfg.metric])


def run(cfg: EvalConfig, overrides: Optional[dict[str, Any]] = None, name: Optional[str] = None) -> dict:
    """Evaluate this shard of the task; return (and write) metrics.json's content.

    `overrides` (key -> typed value: what this point of a sweep sets) and `name` go to the W&B run (name: default
    task/model). The W&B run opens before the settings are checked, so a sweep point that fails shows in its group."""
    if cfg.output_dir is None:
        raise EvalError("output_dir is not set (eval.py sets it to Hydra's output dir)")
    config = dict(dataclasses.asdict(cfg), overrides=dict(overrides or {}))
    logger = open_logger(cfg.logger, config, name or f"{cfg.task.name}/{_model_name(cfg)}")
    try:
        check(cfg)  # eval.py checked it already; callers of the Python API may not have
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.task.name == "lm_eval":
            metrics = _run_lm_eval(cfg, out, logger)
        else:
            metrics = _run(cfg, tasks.load(cfg.task), out, logger)
    except BaseException as e:
        logger.finish(e)
        raise
    logger.finish(None)
    return metrics


def _model_name(cfg: EvalConfig) -> str:
    return cfg.model.name or (Path(cfg.model.path.rstrip("/")).name if cfg.model.path else cfg.model.source)


def _run(cfg: EvalConfig, task: tasks.Task, out: Path, logger) -> dict:
    loaded = load_model(cfg.model)
    fp = fingerprint(loaded.info)
    logger.update_config(fingerprint=fp)
    tok = loaded.tokenizer
    ids = [task.prompt_ids(ex, tok) for ex in task.examples]
    batches = shard_batches(ids, cfg.batch_size, cfg.shard_index, cfg.num_shards)
    mine = [i for b in batches for i in b]
    key = config_key(cfg)
    path = out / SAMPLES
    done = _resume(path, key, set(mine)) if cfg.resume else {}
    if not cfg.resume and path.exists():
        path.unlink()
    if done:
        log.info("resuming from %s: %d of %d samples already done", path, len(done), len(mine))
    sampler = Sampler(loaded.model, loaded.info.ids, decode=tok.decode)
    records = dict(done)
    bar = tqdm(total=len(mine), initial=len(done), desc=f"eval {task.name}", unit="sample", disable=not cfg.progress)
    with open(path, "a") as f, bar:
        def on_finished(i, result, run_id, run_s, run_forwards):  # written at once: a killed run loses no sample
            records[i] = _record(task, task.examples[i], result, tok, key, run_id, loaded.info.threads)
            records[i].update(run_s=run_s, run_forwards=run_forwards)
            f.write(json.dumps(records[i]) + "\n")
            f.flush()
            bar.update(1)
            bar.set_postfix(accuracy=f"{sum(r['correct'] for r in records.values()) / len(records):.3f}",
                            refresh=False)

        todo = [[i for i in b if i not in done] for b in batches]
        feed(sampler, {i: _request(ids[i], cfg, i) for b in todo for i in b}, todo, cfg.batch_size, cfg.feed,
             on_finished)
    ordered = [records[i] for i in sorted(records)]
    metrics = summarize(ordered)
    metrics.update(complete=len(records) == len(mine), expected=len(mine), resumed=len(done), task=task.name,
                   model=loaded.info.name, shard=dict(index=cfg.shard_index, num_shards=cfg.num_shards), key=key,
                   wandb=logger.info(), fingerprint=fp, config=dataclasses.asdict(cfg))
    write_json(out / METRICS, metrics)
    logger.log(metrics, ordered)
    log.info("%s on %s: accuracy %.4f (%d/%d), %.1f tokens/s (%s torch threads), %.1f NFE/sample -> %s",
             loaded.info.name, task.name, metrics["accuracy"], metrics["correct"], metrics["n"],
             metrics["tokens_per_s"], metrics["threads"], metrics["nfe_mean"], out)
    return metrics


def _run_lm_eval(cfg: EvalConfig, out: Path, logger) -> dict:
    """task=lm_eval: lm-eval's tasks through our model (lm_eval_adapter.py); every metric lm-eval reports, the speed
    of the generation requests (their stats in generations.jsonl), one samples.jsonl line per (sample, filter).
    Resume: lm-eval's request cache in the output dir, named by the config key (a rerun answers the requests it
    holds; resume=false deletes it). A shard evaluates every num_shards-th document of each task."""
    from llada_xp import lm_eval_adapter

    loaded = load_model(cfg.model)
    fp = fingerprint(loaded.info)
    logger.update_config(fingerprint=fp)
    key = config_key(cfg)
    cache = out / f"{LM_EVAL_CACHE}{key}"
    db = Path(f"{cache}_rank0.db")  # the name lm-eval gives it
    if not cfg.resume:
        for old in out.glob(f"{LM_EVAL_CACHE}*"):
            old.unlink()
    others = [p.name for p in out.glob(f"{LM_EVAL_CACHE}*.db") if p != db]
    if others:
        raise EvalError(f"{out} holds the lm-eval request cache of another configuration ({others[0]}; model, sampler "
                        f"or task changed); use a new output dir or resume=false to start over")
    resumed = 0
    if db.exists():
        from sqlitedict import SqliteDict

        with SqliteDict(str(db), flag="r") as d:
            resumed = len(d)
        log.info("resuming from %s: %d lm-eval requests already answered", db, resumed)
    bar = tqdm(desc=f"eval lm_eval {','.join(cfg.task.tasks)}", unit="generation", disable=not cfg.progress)
    with bar:
        results, records, lm = lm_eval_adapter.run_tasks(cfg, loaded, progress=bar.update, cache=str(cache))
    for name, rows in ((SAMPLES, [dict(r, key=key) for r in records]), (GENERATIONS, lm.records)):
        with open((out / name).with_suffix(".tmp"), "w") as f:
            f.write("".join(json.dumps(r, default=str) + "\n" for r in rows))
        (out / name).with_suffix(".tmp").replace(out / name)
    metrics = _lm_eval_metrics(results, records, lm.records, lm.likelihood)
    metrics.update(complete=True, expected=metrics["n"], resumed=resumed, task="lm_eval:" + ",".join(cfg.task.tasks),
                   model=loaded.info.name, shard=dict(index=cfg.shard_index, num_shards=cfg.num_shards), key=key,
                   wandb=logger.info(), fingerprint=fp, config=dataclasses.asdict(cfg))
    write_json(out / METRICS, metrics)
    logger.log(metrics, records)
    log.info("%s on %s: %s -> %s", loaded.info.name, metrics["task"],
             ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float) and "_stderr/" not in k), out)
    return metrics


def _lm_eval_metrics(results: dict, records: list[dict], generations: list[dict], likelihood: dict) -> dict:
    """metrics.json's numbers of task=lm_eval (a run, a shard or merged shards): lm-eval's metrics, `accuracy` (what
    sweeps, reports and plots read: lm-eval's first metric of the first task, named by `accuracy_metric`), documents,
    and the speed of the generation and likelihood requests."""
    primary = next((k for k in results if "/" in k and "_stderr/" not in k), None)
    metrics = dict(results, accuracy=results.get(primary), accuracy_metric=primary)
    metrics.update(n=len({(r["task"], r["index"]) for r in records}), generation_requests=len(generations))
    if generations:
        metrics.update(speed(generations))
    if likelihood["loglikelihood_requests"]:
        metrics.update(likelihood)
    return metrics


def feed(sampler: Sampler, requests: dict[int, Request], batches: list[list[int]], batch_size: int, how: str,
         on_finished) -> None:
    """Decode `requests` (by example index) through the sampler's running set; on_finished(index, result, run id,
    run_s, run_forwards) as each finishes (run_s / run_forwards: the run's time and forwards so far).

    continuous: one stream of the batches' examples in order, refilled as rows finish (at steps where joining costs
    no extra forward, or once the set is half empty), so the set stays full until the task runs out (one run);
    static: batch after batch, each run to its end (one run each)."""
    streams = [[i for b in batches for i in b]] if how == "continuous" else [b for b in batches if b]
    for stream in streams:
        pending = deque(stream)
        run_id, t0 = uuid.uuid4().hex[:8], time.perf_counter()

        def on_event(ev, run_id=run_id, t0=t0):
            if isinstance(ev, Finished):
                on_finished(ev.index, ev.result, run_id, time.perf_counter() - t0, rs.forwards)

        rs = sampler.running(on_event)
        try:
            while pending or rs:
                # join where it costs no forward of its own (a running row starts a block), or before the set is
                # down to half full
                if rs.joins_free or len(rs) <= batch_size // 2:
                    while pending and len(rs) < batch_size:
                        i = pending.popleft()
                        rs.add(requests[i], i)
                rs.step()
        finally:
            rs.close()


def shard_batches(ids: list[list[int]], batch_size: int, shard_index: int, num_shards: int) -> list[list[int]]:
    """This shard's batches of example indices. Examples are sorted by prompt length (less padding), cut into
    fixed batches, and batch k belongs to shard k % num_shards — so every sample runs in the same batch whether
    sharded or not."""
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    return [b for k, b in enumerate(batches) if k % num_shards == shard_index]


def _request(prompt: list[int], cfg: EvalConfig, index: int) -> Request:
    s = cfg.sampler
    # Each sample draws from its own seed (seed + index): reproducible whatever its batch, shard or restart.
    settings = dataclasses.replace(s, stop=list(s.stop) + list(cfg.task.stop),
                                   seed=None if s.seed is None else s.seed + index)
    return Request(prompt, settings)


def _record(task, ex, result, tok, key: str, batch_id: str, threads: int) -> dict:
    output = tok.decode(result.tokens, skip_special_tokens=True)
    if isinstance(result.stop, str) and result.stop in output:
        output = output[:output.find(result.stop)]
    st = result.stats
    return dict(index=ex.index, prompt=task.prompt(ex), output=output, reference=ex.reference,
                correct=bool(task.score(output, ex.reference)), nfe=st.nfe, tokens=len(result.tokens),
                committed=st.committed, finish_reason=result.finish_reason, latency_s=st.wall_s,
                forward_s=st.forward_s, batch=batch_id, threads=threads, key=key)


def config_key(cfg: EvalConfig) -> str:
    """A hash of what decides the samples (model, sampler, task): resumed and merged samples must share it.

    model.threads is left out: it changes speed, not samples (a resume on another thread count keeps its samples;
    each sample records its threads, and summarize says when a result's speed mixes thread counts). Fields left at
    None (unset / automatic) are left out too, so a release that adds an optional field keeps earlier runs
    resumable."""
    what = {k: dataclasses.asdict(getattr(cfg, k)) for k in ("model", "sampler", "task")}
    what["model"].pop("threads")
    what = {k: {f: v for f, v in group.items() if v is not None} for k, group in what.items()}
    return hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------- samples
def read_samples(path: Path, repair: bool = False) -> list[dict]:
    """The records of a samples.jsonl. A torn last line (the process died while writing it) is dropped — and cut
    from the file when `repair` — any other unreadable line is an error."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records, good = [], 0
    for n, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines) - 1:  # the last line, without its newline: a write cut short
                log.warning("%s: dropping a torn last line (%d bytes)", path, len(line))
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(good)
                break
            raise EvalError(f"{path}:{n + 1}: not a JSON line ({e}); the file is damaged") from e
        good += len(line) + 1
    return records


def _resume(path: Path, key: str, mine: set[int]) -> dict[int, dict]:
    done: dict[int, dict] = {}
    for rec in read_samples(path, repair=True):
        if rec.get("key") != key:
            raise EvalError(f"{path} holds samples of another configuration (key {rec.get('key')} != {key}: model, "
                            f"sampler or task changed); use a new output dir or resume=false to start over")
        if rec["index"] not in mine:
            raise EvalError(f"{path} holds sample {rec['index']}, which is not in this shard; "
                            f"shard_index / num_shards / batch_size changed? use a new output dir")
        done[rec["index"]] = rec
    return done


def summarize(records: list[dict]) -> dict:
    """Metrics of a list of sample records (the same function for runs, resumes and merges): accuracy and `speed`."""
    n = len(records)
    if n == 0:
        raise EvalError("no samples to summarize (empty task or shard?)")
    correct = sum(r["correct"] for r in records)
    return dict(n=n, correct=correct, accuracy=correct / n, **speed(records))


def speed(records: list[dict]) -> dict:
    """Speed figures of generation records (nfe, tokens, committed, latency_s, batch, finish_reason, threads).

    tokens/s counts answer tokens over the time the sampler spent: per batch (a continuous feed is one), the time
    until its last sample finished (`run_s`; records without it: the slowest sample's latency). threads:
    the torch CPU threads the samples ran with — a list of the counts when they differ (resumed or merged runs), as
    the speed figures then mix them (None: samples written before threads were recorded)."""
    n = len(records)
    threads = sorted({r.get("threads") for r in records}, key=str)
    if len(threads) > 1:
        log.warning("the samples ran with different torch thread counts %s: tokens/s and latencies mix them", threads)
    nfe = [r["nfe"] for r in records]
    batch_time: dict[str, float] = {}
    batch_forwards: dict[str, int] = {}
    for r in records:  # run_s / run_forwards: the sampler's time and forwards so far (older records: latency, NFE)
        batch_time[r["batch"]] = max(batch_time.get(r["batch"], 0.0), r.get("run_s", r["latency_s"]))
        batch_forwards[r["batch"]] = max(batch_forwards.get(r["batch"], 0), r.get("run_forwards", r["nfe"]))
    seconds = sum(batch_time.values())
    tokens = sum(r["tokens"] for r in records)
    lat = np.array([r["latency_s"] for r in records])
    return dict(
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0, generated_tokens=tokens, answer_tokens_mean=tokens / n,
        seconds=seconds, nfe_mean=sum(nfe) / n, nfe_total=sum(nfe), model_forwards=sum(batch_forwards.values()),
        tokens_per_forward_mean=sum(r["committed"] / r["nfe"] for r in records if r["nfe"]) / n,
        tokens_per_forward_total=sum(r["committed"] for r in records) / sum(nfe) if sum(nfe) else 0.0,
        latency_mean_s=float(lat.mean()), latency_p50_s=float(np.percentile(lat, 50)),
        latency_p90_s=float(np.percentile(lat, 90)), latency_p99_s=float(np.percentile(lat, 99)),
        latency_max_s=float(lat.max()),
        finished_by_length=sum(r["finish_reason"] == "length" for r in records),
        threads=threads[0] if len(threads) == 1 else threads,
    )


# --------------------------------------------------------------------------------------------------- merge
def merge(shard_dirs: list[Path], out: Path) -> dict:
    """Join the output dirs of all shards of one evaluation into `out` (samples.jsonl by index + metrics.json)."""
    records, metrics = join(shard_dirs)
    out.mkdir(parents=True, exist_ok=True)
    (out / SAMPLES).write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    metrics["config"]["output_dir"] = str(out)
    write_json(out / METRICS, metrics)
    return metrics


def join(shard_dirs: list[Path]) -> tuple[list[dict], dict]:
    """The samples (by index) and metrics of all shards of one evaluation, checked to be that; writes nothing."""
    if not shard_dirs:
        raise EvalError("merge: no shard dirs given")
    metas = []
    for d in shard_dirs:
        if not (Path(d) / METRICS).exists():
            raise EvalError(f"merge: {d} has no {METRICS} (not an eval output dir, or the shard did not finish)")
        metas.append(json.loads((Path(d) / METRICS).read_text()))
    num = {m["shard"]["num_shards"] for m in metas}
    keys = {m["key"] for m in metas}
    if len(num) != 1 or len(keys) != 1:
        raise EvalError(f"merge: the dirs are not shards of one evaluation (num_shards {sorted(num)}, "
                        f"config keys {sorted(keys)})")
    got = sorted(m["shard"]["index"] for m in metas)
    if got != list(range(num.pop())):
        raise EvalError(f"merge: need each shard index exactly once, got {got}")
    for d, m in zip(shard_dirs, metas):
        if not m["complete"]:
            raise EvalError(f"merge: shard {m['shard']['index']} in {d} is incomplete ({m['n']}/{m['expected']}); "
                            f"rerun it on the same dir to finish")
    shard_dirs, metas = zip(*sorted(zip(shard_dirs, metas), key=lambda dm: dm[1]["shard"]["index"]))
    records = [r for d in shard_dirs for r in read_samples(Path(d) / SAMPLES)]
    lm_eval = metas[0]["config"]["task"]["name"] == "lm_eval"
    seen = [(r["task"], r["filter"], r["index"]) if lm_eval else r["index"] for r in records]
    if len(seen) != len(set(seen)):
        raise EvalError("merge: a sample index appears in more than one shard")
    if lm_eval:
        records, metrics = _join_lm_eval(shard_dirs, metas, records)
    else:
        records.sort(key=lambda r: r["index"])
        metrics = summarize(records)
    config = dict(metas[0]["config"], shard_index=0, num_shards=1, output_dir=None)
    metrics.update(complete=True, expected=metrics["n"], resumed=0, task=metas[0]["task"], model=metas[0]["model"],
                   shard=dict(index=0, num_shards=1), key=metas[0]["key"], wandb=None,
                   fingerprint=metas[0]["fingerprint"], config=config, merged_from=[str(d) for d in shard_dirs])
    return records, metrics


def _join_lm_eval(shard_dirs, metas, records: list[dict]) -> tuple[list[dict], dict]:
    """task=lm_eval shards: the samples in the unsharded run's order (task, filter, document), lm-eval's metrics
    recomputed from all of them (`lm_eval_adapter.merge_results`: not a mean of the shards' numbers — bleu, f1 and
    stderr are not), the speed figures of all generation requests and the likelihood counts summed."""
    from llada_xp import lm_eval_adapter

    first_seen: dict[tuple, int] = {}  # shard 0 holds every task and filter, in the unsharded order
    for r in records:
        first_seen.setdefault((r["task"], r["filter"]), len(first_seen))
    records.sort(key=lambda r: (first_seen[(r["task"], r["filter"])], r["index"]))
    documents = metas[0]["lm_eval"]["documents"]
    for task, n in documents.items():
        got = len({r["index"] for r in records if r["task"] == task})
        if got != n:
            raise EvalError(f"merge: the shards hold {got} of the {n} documents of task {task}")
    t = metas[0]["config"]["task"]
    try:
        results = lm_eval_adapter.merge_results(t["tasks"], t["include_path"], records)
    except lm_eval_adapter.LmEvalError as e:
        raise EvalError(f"merge: {e}") from None
    for name, why in results["lm_eval"]["not_merged"].items():
        log.warning("merge: %s is not merged: %s", name, why)
    generations = [g for d in shard_dirs for g in read_samples(Path(d) / GENERATIONS)]
    likelihood = {k: sum(m.get(k, 0) for m in metas)
                  for k in ("loglikelihood_requests", "loglikelihood_s", "loglikelihood_forwards")}
    metrics = _lm_eval_metrics(results, records, generations, likelihood)
    # n-shot as the shards ran them (the tasks merge_results loads carry no task.num_fewshot)
    metrics["lm_eval"].update(n_shot=metas[0]["lm_eval"]["n_shot"], documents=documents,
                              seconds=sum(m["lm_eval"]["seconds"] for m in metas))
    return records, metrics


# --------------------------------------------------------------------------------------------------- logging
class _NoLogger:
    def info(self) -> Optional[dict]:
        return None

    def update_config(self, **kw) -> None:
        pass

    def log(self, metrics: dict, records: list[dict]) -> None:
        pass

    def finish(self, error: Optional[BaseException]) -> None:
        pass


class _WandbLogger:
    """One W&B run per evaluation, named after its overrides: config = the resolved config, the overrides (typed
    values) and the fingerprint; the numeric metrics logged (the UI's charts) and in the summary; a per-sample table.
    A failed evaluation finishes its run with exit code 1 and the error in the summary."""

    def __init__(self, cfg: LoggerConfig, config: dict, name: str):
        self.cfg = cfg
        self.run = init_wandb(cfg, config=config, job_type="eval", name=name)

    def info(self) -> dict:
        run = self.run
        return dict(id=run.id, project=run.project, group=self.cfg.group, dir=run.dir, name=run.name)

    def update_config(self, **kw) -> None:
        self.run.config.update(kw)

    def log(self, metrics: dict, records: list[dict]) -> None:
        import wandb

        logged: dict[str, Any] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.cfg.log_samples:
            cols = ["index", "prompt", "output", "reference", "correct", "nfe"]
            if records and "task" in records[0]:  # task=lm_eval's records
                cols = ["task", "index", "filter", "prompt", "output", "target", "metrics"]
            cell = (lambda v: v if v is None or isinstance(v, (str, int, float)) else json.dumps(v, default=str))
            logged["samples"] = wandb.Table(columns=cols, data=[[cell(r.get(c)) for c in cols] for r in records])
        self.run.log(logged)  # also sets the summary of these keys
        self.run.summary.update({k: v for k, v in metrics.items() if isinstance(v, str)})

    def finish(self, error: Optional[BaseException]) -> None:
        if error is not None:
            self.run.summary.update(dict(error=f"{type(error).__name__}: {error}"))
        self.run.finish(exit_code=0 if error is None else 1)


def open_logger(cfg: LoggerConfig, config: dict, name: str):
    if cfg.name == "none":
        return _NoLogger()
    if cfg.name == "wandb":
        return _WandbLogger(cfg, config, name)
    raise EvalError(f"logger.name must be none or wandb, got {cfg.name!r}")


def wandb_mode(cfg: LoggerConfig) -> Optional[str]:
    """logger.mode, else $WANDB_MODE (None: wandb reads it), else online with an API key and offline without."""
    if cfg.mode is not None:
        if cfg.mode not in WANDB_MODES:
            raise EvalError(f"logger.mode must be one of {WANDB_MODES} or null, got {cfg.mode!r}")
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return None
    if _has_wandb_key():
        return "online"
    log.info("W&B: no API key configured, logging offline (upload later with `wandb sync`)")
    return "offline"


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def init_wandb(cfg: LoggerConfig, **kw):
    """wandb.init with the logger config's project / entity / group / tags / mode / dir."""
    import wandb

    if cfg.dir:
        Path(cfg.dir).mkdir(parents=True, exist_ok=True)
    return wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags) or None,
                      mode=wandb_mode(cfg), dir=cfg.dir, **kw)


# --------------------------------------------------------------------------------------------------- helpers
def fingerprint(info) -> dict:
    """Hardware and library versions, and the loaded model, for metrics.json."""
    import torch

    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    cuda = torch.cuda.is_available()
    return dict(
        hostname=socket.gethostname(), platform=platform.platform(), python=platform.python_version(),
        cpu=_cpu_name(), cpu_count=os.cpu_count(), cuda=torch.version.cuda if cuda else None,
        gpu=torch.cuda.get_device_name() if cuda else None, gpu_count=torch.cuda.device_count() if cuda else 0,
        packages=versions, model=dict(dataclasses.asdict(info)),
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: Path, obj: dict) -> None:
    """obj as JSON at path, whole or not at all (tmp file + rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m llada_xp.evaluate", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mp = sub.add_parser("merge", help="join the output dirs of all shards of one evaluation")
    mp.add_argument("shards", nargs="+", type=Path, help="the shards' output dirs")
    mp.add_argument("--out", type=Path, required=True, help="where the merged samples.jsonl and metrics.json go")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        m = merge(args.shards, args.out)
    except EvalError as e:
        raise SystemExit(f"error: {e}") from None
    what = f"({m['correct']}/{m['n']})" if "correct" in m else f"({m['accuracy_metric']}, {m['n']} documents)"
    speed_ = f", {m['tokens_per_s']:.1f} tokens/s" if "tokens_per_s" in m else ""
    print(f"merged {len(args.shards)} shards into {args.out}: accuracy {m['accuracy']:.4f} {what}{speed_}")


if __name__ == "__main__":
    main()
