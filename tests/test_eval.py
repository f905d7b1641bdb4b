"""eval.py and the eval loop: metrics, samples, resume after a kill, shards + merge, W&B offline runs, sweeps.

The slow tests run eval.py as a subprocess with real Hydra on the demo model; the rest call llada_xp.evaluate
in-process with a tiny model.
"""

import csv
import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llada_xp.config import ConfigError, EvalConfig, LoggerConfig, ModelConfig, SamplerConfig, TaskConfig, register
from llada_xp.evaluate import (METRICS, SAMPLES, TIMING_FIELDS, EvalError, config_key, evaluate, merge, read_samples, run,
                               shard_batches, summarize)
from llada_xp.loading import special_ids
from llada_xp.sampler import Request, Sampler
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
LIMIT, BATCH = 12, 4  # 3 batches


# --------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random model (one answer ends early), and a jsonl task whose even references are its answers."""
    d = tmp_path_factory.mktemp("tiny")
    m = tiny.model(seed=13, dtype=torch.float32, sharpen=30.0, eos_boost=1.3)
    tiny.write_hub_folder(d / "model", m)
    words = [w for w in tiny.WORDS if w.strip()]
    prompts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(2 + i % 9)) for i in range(LIMIT)]
    tok = tiny.tokenizer()
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True,
                                   return_dict=False) for p in prompts]
    settings = SamplerConfig(gen_length=16, steps=16, block_length=8)
    outs = Sampler(m, special_ids(m.config, tok)).generate([Request(i, settings) for i in ids])
    rows = [{"prompt": p, "answer": tok.decode(r.tokens, skip_special_tokens=True) if i % 2 == 0 else "cat"}
            for i, (p, r) in enumerate(zip(prompts, outs))]
    (d / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture(scope="module")
def model_args() -> list[str]:
    """eval.py overrides: the demo model on its task."""
    return ["model=demo", "task=demo", "sampler.gen_length=64", "sampler.steps=64", f"task.limit={LIMIT}",
            f"batch_size={BATCH}", "progress=false", "sampler.block_length=8"]


def env(tmp: Path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_DIR=str(tmp), OMP_NUM_THREADS="1",
                WANDB_SILENT="true", PYTHONPATH=str(ROOT))


def eval_py(args: list[str], tmp: Path, script: str = "eval.py", extra_env: dict = None, check=True):
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, env={**env(tmp), **(extra_env or {})},
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"eval.py {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def stable(records: list[dict]) -> list[dict]:
    """Sample records without timing fields, by index: what must be equal between identical evaluations."""
    return sorted(({k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records), key=lambda r: r["index"])


def wandb_records(path: Path):
    """Records of a .wandb file (W&B's LevelDB-style log: 7-byte header, 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            if pos > len(data):  # a record still being written
                return
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            yield r


def wandb_runs(wandb_dir: Path, timeout: float = 20.0) -> list[dict]:
    """Each offline run under wandb_dir: name, group, job type, config, summary, logged keys and values, exit code.

    wandb's service process may still be flushing a run's .wandb file after finish() returns: read until every run
    has its run and exit records (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [_read_run(d) for d in sorted((wandb_dir / "wandb").glob("offline-run-*"))]
        if all("group" in r and r["exit"] is not None for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def _read_run(d: Path) -> dict:
    run = dict(dir=d, config={}, summary={}, logged=set(), history={}, exit=None)
    f = next(d.glob("*.wandb"), None)
    if f is None or f.stat().st_size < 7:
        return run
    for r in wandb_records(f):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.update(group=r.run.run_group, job_type=r.run.job_type, project=r.run.project,
                       tags=list(r.run.tags), name=r.run.display_name)
            run["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            run["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "summary":
            run["summary"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
        elif kind == "history":
            run["logged"] |= {(u.key or "/".join(u.nested_key)).split("/")[0] for u in r.history.item}
            run["history"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.history.item})
        elif kind == "exit":
            run["exit"] = r.exit.exit_code
    return run


def tiny_cfg(tiny_dir: Path, out: Path, **kw) -> EvalConfig:
    base = dict(model=ModelConfig(source="hf", path=str(tiny_dir / "model")),
                sampler=SamplerConfig(gen_length=16, steps=16, block_length=8),
                task=TaskConfig(name="jsonl", path=str(tiny_dir / "qa.jsonl")),
                batch_size=BATCH, output_dir=str(out), progress=False)
    return EvalConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------- in-process
def test_shards_take_whole_batches_of_the_unsharded_run():
    ids = [[0] * (i % 5 + 1) for i in range(23)]
    whole = shard_batches(ids, 4, 0, 1)
    parts = [shard_batches(ids, 4, k, 3) for k in range(3)]
    assert sorted(b for p in parts for b in p) == sorted(whole)
    assert sorted(i for b in whole for i in b) == list(range(23))
    assert all(len({len(ids[i]) for i in b}) <= 2 for b in whole)  # sorted by prompt length: little padding


def test_summary_counts_accuracy_nfe_and_batch_time():
    rec = dict(nfe=4, tokens=6, committed=8, finish_reason="stop", forward_s=0.1)
    records = [dict(rec, index=0, correct=True, latency_s=1.0, batch="a"),
               dict(rec, index=1, correct=False, latency_s=2.0, batch="a"),
               dict(rec, index=2, correct=True, latency_s=1.0, batch="b", nfe=8)]
    m = summarize(records)
    assert (m["n"], m["correct"], m["accuracy"]) == (3, 2, 2 / 3)
    assert m["seconds"] == 3.0 and m["tokens_per_s"] == 18 / 3.0  # per batch: its slowest sample
    assert (m["nfe_total"], m["nfe_mean"], m["model_forwards"]) == (16, 16 / 3, 12)
    assert m["tokens_per_forward_total"] == 24 / 16 and m["tokens_per_forward_mean"] == (2 + 2 + 1) / 3
    assert m["latency_max_s"] == 2.0 and m["latency_p50_s"] == 1.0


def test_a_torn_last_line_is_dropped_and_cut_from_the_file(tmp_path):
    p = tmp_path / SAMPLES
    p.write_text('{"index": 0}\n{"index": 1}\n{"ind')
    assert read_samples(p) == [{"index": 0}, {"index": 1}]
    assert p.read_text().endswith('{"ind')  # reading alone leaves the file alone
    assert read_samples(p, repair=True) == [{"index": 0}, {"index": 1}]
    assert p.read_text() == '{"index": 0}\n{"index": 1}\n'
    p.write_text('{"index": 0}\ngarbage\n{"index": 2}\n')
    with pytest.raises(EvalError, match=f"{SAMPLES}:2"):
        read_samples(p)


def test_in_process_run_writes_samples_that_recompute_to_its_metrics(tiny_dir, tmp_path):
    m = run(tiny_cfg(tiny_dir, tmp_path))
    records = read_samples(tmp_path / SAMPLES)
    assert len(records) == m["n"] == LIMIT and m["complete"] and m["resumed"] == 0
    assert m["accuracy"] == sum(r["correct"] for r in records) / len(records)
    assert {r["finish_reason"] for r in records} == {"stop", "length"}
    assert 0 < m["accuracy"] < 1
    assert json.loads((tmp_path / METRICS).read_text())["accuracy"] == m["accuracy"]
    assert not (tmp_path / "wandb").exists()  # logger=none logs nothing


def test_continuous_feed_gives_the_static_batches_samples_with_batch_size_rows_running(tiny_dir, tmp_path):
    cont = run(tiny_cfg(tiny_dir, tmp_path / "c"))
    static = run(tiny_cfg(tiny_dir, tmp_path / "s", feed="static"))
    c, s = read_samples(tmp_path / "c" / SAMPLES), read_samples(tmp_path / "s" / SAMPLES)
    assert stable(c) == stable(s) and cont["accuracy"] == static["accuracy"]
    assert len({r["batch"] for r in c}) == 1 and len({r["batch"] for r in s}) == LIMIT // BATCH
    # one stream: the rows never outnumber batch_size, and its forwards are the set's, not a sum of batches
    assert cont["model_forwards"] == max(r["run_forwards"] for r in c)
    assert cont["model_forwards"] >= max(r["nfe"] for r in c) and cont["seconds"] == max(r["run_s"] for r in c)


def test_rerun_on_a_finished_dir_recomputes_nothing(tiny_dir, tmp_path):
    first = run(tiny_cfg(tiny_dir, tmp_path))
    before = (tmp_path / SAMPLES).read_text()
    again = run(tiny_cfg(tiny_dir, tmp_path))
    assert (tmp_path / SAMPLES).read_text() == before
    assert again["resumed"] == LIMIT and again["accuracy"] == first["accuracy"]


def test_resume_on_another_thread_count_keeps_the_samples_and_says_the_speed_mixes_them(tiny_dir, tmp_path):
    first = run(tiny_cfg(tiny_dir, tmp_path, model=ModelConfig(source="hf", path=str(tiny_dir / "model"), threads=1)))
    assert first["threads"] == 1 and first["fingerprint"]["model"]["threads"] == 1
    lines = (tmp_path / SAMPLES).read_text().splitlines(keepends=True)
    (tmp_path / SAMPLES).write_text("".join(lines[:4]))  # as if it was stopped after 4 samples
    m = run(tiny_cfg(tiny_dir, tmp_path, model=ModelConfig(source="hf", path=str(tiny_dir / "model"), threads=2)))
    assert m["resumed"] == 4 and m["n"] == LIMIT and m["complete"]
    assert [r["threads"] for r in read_samples(tmp_path / SAMPLES)] == [1] * 4 + [2] * (LIMIT - 4)
    assert m["threads"] == [1, 2]  # tokens/s mixes two thread counts, and says so
    assert summarize(read_samples(tmp_path / SAMPLES)[4:])["threads"] == 2


def test_config_key_ignores_unset_fields_so_new_optional_fields_keep_runs_resumable(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path)
    key = config_key(cfg)
    assert config_key(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, adapter=None))) == key
    assert config_key(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mask_token_id=7))) != key
    assert config_key(dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, threshold=None))) != key


def test_resume_refuses_samples_of_another_configuration(tiny_dir, tmp_path):
    run(tiny_cfg(tiny_dir, tmp_path, task=TaskConfig(name="jsonl", path=str(tiny_dir / "qa.jsonl"), limit=4)))
    changed = tiny_cfg(tiny_dir, tmp_path, sampler=SamplerConfig(gen_length=16, steps=8, block_length=8))
    with pytest.raises(EvalError, match="another configuration"):
        run(changed)
    fresh = run(dataclasses.replace(changed, resume=False))  # resume=false starts over
    assert fresh["n"] == LIMIT and fresh["resumed"] == 0


def test_evaluate_returns_the_configured_metric_and_rejects_unknown_ones(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path, task=TaskConfig(name="jsonl", path=str(tiny_dir / "qa.jsonl"), limit=4),
                   metric="nfe_mean")
    assert evaluate(cfg) == json.loads((tmp_path / METRICS).read_text())["nfe_mean"]
    with pytest.raises(EvalError, match="metric='speed' is not a number"):
        evaluate(dataclasses.replace(cfg, metric="speed"))


def test_bad_settings_fail_before_loading_the_model(tmp_path):
    cfg = EvalConfig(model=ModelConfig(source="hf", path=str(tmp_path / "nowhere")), task=TaskConfig(name="demo"),
                     output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="threshold"):
        run(dataclasses.replace(cfg, sampler=SamplerConfig(threshold=2.0)))
    with pytest.raises(ConfigError, match="shard_index"):
        run(dataclasses.replace(cfg, shard_index=2, num_shards=2))


def test_wandb_run_is_finished_as_failed_with_its_error_when_the_evaluation_fails(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg(tiny_dir, tmp_path / "out", model=ModelConfig(source="hf", path=str(tmp_path / "no_model")),
                   logger=LoggerConfig(name="wandb", mode="offline", group="g", tags=["t"], dir=str(tmp_path)))
    from llada_xp.loading import ModelLoadError

    with pytest.raises(ModelLoadError):
        run(cfg)
    with pytest.raises(ValueError, match="threshold"):  # a bad setting: the point still shows in its W&B group
        run(dataclasses.replace(cfg, sampler=SamplerConfig(threshold=2.0)), name="sampler.threshold=2.0")
    no_model, bad = sorted(wandb_runs(tmp_path), key=lambda r: r["config"]["sampler"]["threshold"])
    assert no_model["exit"] == 1 and no_model["group"] == "g" and no_model["tags"] == ["t"]
    assert no_model["config"]["model"]["path"] == str(tmp_path / "no_model")
    assert no_model["summary"]["error"].startswith("ModelLoadError: model folder not found")
    assert bad["exit"] == 1 and bad["name"] == "sampler.threshold=2.0" and "threshold" in bad["summary"]["error"]
    assert "accuracy" not in no_model["summary"] | bad["summary"]


def test_wandb_run_logs_the_metrics_and_holds_the_overrides_and_fingerprint(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg(tiny_dir, tmp_path / "out", task=TaskConfig(name="jsonl", path=str(tiny_dir / "qa.jsonl"), limit=4),
                   logger=LoggerConfig(name="wandb", mode="offline", dir=str(tmp_path), log_samples=False))
    m = run(cfg, overrides={"sampler.threshold": 0.9, "task.limit": 4})
    (r,) = wandb_runs(tmp_path)
    assert r["name"] == "jsonl/model" and m["wandb"]["name"] == r["name"]  # no name given: task/model
    for key in ("accuracy", "tokens_per_s", "nfe_mean", "latency_p50_s", "n", "threads"):
        assert r["history"][key] == r["summary"][key] == m[key], key  # run.log: the UI charts them
    assert r["summary"]["task"] == "jsonl" and "task" not in r["logged"]  # strings: summary only
    assert r["config"]["overrides"] == {"sampler.threshold": 0.9, "task.limit": 4}
    assert r["config"]["fingerprint"] == json.loads(json.dumps(m["fingerprint"])) and m["fingerprint"]["cpu_count"]


def test_merge_refuses_incomplete_or_missing_shards(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path / "s0", num_shards=2)
    run(cfg)
    with pytest.raises(EvalError, match="each shard index exactly once"):
        merge([tmp_path / "s0"], tmp_path / "merged")
    with pytest.raises(EvalError, match="has no metrics.json"):
        merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")


def test_every_experiment_composes_for_the_gpu_command():
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        base = compose("eval")
        assert (base.model.source, base.task.name, base.logger.name, base.sampler.cache) == ("demo", "demo", "none",
                                                                                                "dual")
        for name, points in (("fast_dllm_ablation", 8), ("threshold_sweep", 7)):
            overrides = [f"experiment={name}", "model=llada_8b_instruct", "task=gsm8k", "logger=wandb"]
            hc = compose("eval", overrides=overrides, return_hydra_config=True).hydra
            assert str(hc.mode) == "RunMode.MULTIRUN"
            n = 1
            for v in hc.sweeper.params.values():
                n *= len(str(v).split(","))
            assert n == points, name
            cfg = OmegaConf.to_object(compose("eval", overrides=overrides))
            assert isinstance(cfg, EvalConfig)
            assert cfg.sampler.steps == cfg.sampler.gen_length == 256 and cfg.sampler.block_length == 32
            assert (cfg.model.path, cfg.task.name, cfg.task.tasks, cfg.task.num_fewshot) == (
                "GSAI-ML/LLaDA-8B-Instruct", "lm_eval", ["gsm8k"], 5)
        abl = compose("eval", overrides=["experiment=fast_dllm_ablation"], return_hydra_config=True)
        assert dict(abl.hydra.sweeper.params) == {"sampler.gen_length": "256,512", "sampler.cache": "none,prefix",
                                                  "sampler.threshold": "null,0.9"}


# --------------------------------------------------------------------------------------------------- eval.py
@pytest.mark.slow
def test_gsm8k_offline_without_its_dataset_cached_fails_naming_it(tmp_path):
    # task=gsm8k is lm-eval's gsm8k; an empty datasets cache stands for a machine that never downloaded it
    p = eval_py(["task=gsm8k", "task.limit=2", "progress=false", f"output_dir={tmp_path / 'out'}"], tmp_path,
                extra_env={"HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "empty")}, check=False)
    err = p.stdout + p.stderr
    assert p.returncode == 1, err[-2000:]
    assert "lm-eval tasks ['gsm8k']: a dataset is not available offline" in err and "openai/gsm8k" in err


@pytest.fixture(scope="module")
def single(model_args, tmp_path_factory):
    """One uninterrupted, unsharded eval.py run: the reference the other slow tests compare against."""
    tmp = tmp_path_factory.mktemp("single")
    eval_py([*model_args, f"hydra.run.dir={tmp / 'run'}"], tmp)
    return tmp / "run"


@pytest.mark.slow
def test_eval_py_writes_metrics_and_samples_that_recompute_exactly(single):
    m = json.loads((single / METRICS).read_text())
    records = read_samples(single / SAMPLES)
    assert m["n"] == len(records) == LIMIT and m["complete"]
    assert m["correct"] == sum(r["correct"] for r in records)
    assert m["accuracy"] == sum(r["correct"] for r in records) / len(records)
    assert m["nfe_total"] == sum(r["nfe"] for r in records)
    for key in ("tokens_per_s", "nfe_mean", "tokens_per_forward_mean", "tokens_per_forward_total", "latency_p50_s",
                "latency_p99_s"):
        assert m[key] > 0, key
    assert set(records[0]) >= {"prompt", "output", "reference", "correct", "nfe"}
    assert m["fingerprint"]["packages"]["torch"] == torch.__version__ and m["fingerprint"]["cpu_count"]
    assert m["config"]["batch_size"] == BATCH and m["config"]["task"]["limit"] == LIMIT
    assert m["config"]["sampler"]["steps"] == m["config"]["sampler"]["gen_length"]
    from llada_xp.demo.task import HELD_OUT_SEED, examples

    assert m["task"] == "demo"
    assert [r["reference"] for r in stable(records)] == [e.answer for e in examples(LIMIT, HELD_OUT_SEED)]
    assert not (single.parent / "wandb").exists()


@pytest.mark.slow
def test_multirun_logs_each_point_to_one_wandb_group_and_reports(model_args, tmp_path):
    sweep = tmp_path / "sweep"
    eval_py(["-m", *model_args, "logger=wandb", "logger.tags=[ci]", "sampler.threshold=0.5,0.9",
             "sampler.cache=none,dual", f"hydra.sweep.dir={sweep}"], tmp_path)
    points = sorted(sweep.glob("[0-9]*/metrics.json"))
    assert len(points) == 4
    metrics = [json.loads(p.read_text()) for p in points]
    runs = wandb_runs(tmp_path)
    evals = sorted((r for r in runs if r["job_type"] == "eval"), key=lambda r: r["config"]["output_dir"])
    (rep,) = [r for r in runs if r["job_type"] == "report"]
    assert len(evals) == 4 and len({r["group"] for r in runs}) == 1 and evals[0]["group"]
    for m, r in zip(metrics, evals):
        thr, cache = m["config"]["sampler"]["threshold"], m["config"]["sampler"]["cache"]
        assert r["name"] == f"sampler.threshold={thr},sampler.cache={cache}"  # the swept overrides
        assert r["config"]["overrides"] | {"logger.tags": ["ci"]} == {
            "model": "demo", "task": "demo", "sampler.gen_length": 64, "sampler.steps": 64, "task.limit": LIMIT,
            "batch_size": BATCH, "progress": False, "sampler.block_length": 8, "logger": "wandb",
            "logger.tags": ["ci"], "sampler.threshold": thr, "sampler.cache": cache}  # typed: 0.5 is a number
        assert r["config"] == m["config"] | {"_wandb": r["config"]["_wandb"], "overrides": r["config"]["overrides"],
                                             "fingerprint": m["fingerprint"]}
        for key in ("accuracy", "nfe_mean", "tokens_per_s", "threads"):
            assert r["history"][key] == r["summary"][key] == m[key], key
        assert "samples" in r["logged"] and r["exit"] == 0 and r["tags"] == ["ci"]
        assert m["wandb"]["id"] in r["dir"].name
    assert [(m["config"]["sampler"]["threshold"], m["config"]["sampler"]["cache"]) for m in metrics] == [
        (0.5, "none"), (0.5, "dual"), (0.9, "none"), (0.9, "dual")]
    assert {"sweep", "quality_vs_speed"} <= rep["logged"] and rep["exit"] == 0
    (table,) = rep["dir"].glob("files/media/table/sweep_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"][:3] == ["point", "sampler.threshold", "sampler.cache"]
    assert [row[1:3] for row in table["data"]] == [[0.5, "none"], [0.5, "dual"], [0.9, "none"], [0.9, "dual"]]
    csv_rows = (sweep / "report.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 4 and csv_rows[0].startswith("point,sampler.threshold,sampler.cache,accuracy")
    assert len((sweep / "report.md").read_text().strip().splitlines()) == 2 + 4
    png = (sweep / "quality_vs_speed.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_a_failing_point_does_not_stop_the_sweep_and_is_reported(model_args, tmp_path):
    sweep = tmp_path / "sweep"
    p = eval_py(["-m", *model_args, "sampler.threshold=0.9,2.0,0.7", f"hydra.sweep.dir={sweep}"], tmp_path,
                check=False)
    assert p.returncode == 1, p.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").exists() and (sweep / "2" / "metrics.json").exists()  # the sweep went on
    failed = json.loads((sweep / "1" / "failed.json").read_text())
    assert not (sweep / "1" / "metrics.json").exists()
    assert "threshold" in failed["error"] and failed["overrides"][-1] == "sampler.threshold=2.0"
    assert Path(failed["log"]).is_file() and "threshold" in Path(failed["log"]).read_text()
    md = (sweep / "report.md").read_text()
    assert "1 failed point(s)" in md and failed["log"] in md and "| 2 | 0.7 |" in md
    csv_rows = (sweep / "report.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 3 and csv_rows[0].endswith(",error") and "threshold" in csv_rows[-1]
    assert (sweep / "quality_vs_speed.png").exists()
    assert "1 of 3 points failed" in p.stdout + p.stderr


@pytest.mark.slow
def test_two_shards_merge_to_exactly_the_unsharded_result(single, model_args, tmp_path):
    sweep = tmp_path / "shards"
    eval_py(["-m", *model_args, "num_shards=2", "shard_index=0,1", f"hydra.sweep.dir={sweep}"], tmp_path)
    whole = json.loads((single / METRICS).read_text())
    (point,) = csv.DictReader(open(sweep / "report.csv"))  # the report: one point, the shards' merged result
    assert point["point"] == "0+1" and int(point["n"]) == LIMIT and float(point["accuracy"]) == whole["accuracy"]
    shard_records = [read_samples(sweep / k / SAMPLES) for k in ("0", "1")]
    assert all(shard_records) and sum(map(len, shard_records)) == LIMIT
    from llada_xp.evaluate import main as evaluate_cli

    evaluate_cli(["merge", str(sweep / "0"), str(sweep / "1"), "--out", str(tmp_path / "merged")])
    merged = json.loads((tmp_path / "merged" / METRICS).read_text())
    for key in ("n", "correct", "accuracy", "nfe_total", "nfe_mean", "generated_tokens", "tokens_per_forward_total",
                "tokens_per_forward_mean", "model_forwards", "key"):
        assert merged[key] == whole[key], key
    assert stable(read_samples(tmp_path / "merged" / SAMPLES)) == stable(read_samples(single / SAMPLES))


KILLER = """
import os, runpy, signal, sys
import llada_xp.evaluate as ev

kill_after, calls = int(os.environ["KILL_AFTER"]), open(os.environ["CALLS"], "a")
record = ev._record

def counted(*a, **k):  # SIGKILL before the sample after `kill_after` is written
    if sum(1 for _ in open(os.environ["CALLS"])) >= kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    calls.write("x\\n"); calls.flush()
    return record(*a, **k)

ev._record = counted
sys.argv = ["eval.py", *sys.argv[1:]]
runpy.run_path("eval.py", run_name="__main__")
"""


@pytest.mark.slow
def test_killed_run_resumes_to_exactly_the_uninterrupted_result(single, model_args, tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    out, calls = tmp_path / "run", tmp_path / "calls.txt"
    args = [*model_args, f"hydra.run.dir={out}"]
    kill_after = BATCH + 1  # one batch done, the next one cut short
    p = eval_py(args, tmp_path, script=str(tmp_path / "killer.py"), check=False,
                extra_env=dict(KILL_AFTER=str(kill_after), CALLS=str(calls)))
    assert p.returncode == -signal.SIGKILL
    written = (out / SAMPLES).read_text()
    assert written.count("\n") == kill_after and not (out / METRICS).exists()
    calls.write_text("")
    eval_py(args, tmp_path, script=str(tmp_path / "killer.py"), extra_env=dict(KILL_AFTER="1000", CALLS=str(calls)))
    assert calls.read_text().count("x") == LIMIT - kill_after  # written samples were not recomputed
    assert (out / SAMPLES).read_text().startswith(written)
    m = json.loads((out / METRICS).read_text())
    whole = json.loads((single / METRICS).read_text())
    assert m["resumed"] == kill_after and m["complete"]
    for key in ("n", "correct", "accuracy", "nfe_total", "generated_tokens", "tokens_per_forward_total"):
        assert m[key] == whole[key], key
    assert stable(read_samples(out / SAMPLES)) == stable(read_samples(single / SAMPLES))
