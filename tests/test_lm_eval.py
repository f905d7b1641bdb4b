"""task=lm_eval: lm-evaluation-harness tasks through our sampler (lm_eval_adapter.py), offline.

The tasks are custom lm-eval YAMLs over tests/data/lm_eval/demo.json (100 held-out demo questions, each with its
answer and three near misses): demo_gen (generate_until, exact match under two filters) and demo_mc
(multiple_choice, by the Monte-Carlo ELBO). The data_files paths are relative to the repository root.
"""

import dataclasses
import json
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance

from llada_xp.config import ConfigError, EvalConfig, ModelConfig, SamplerConfig, TaskConfig, check
from llada_xp.lm_eval_adapter import LladaLM, LmEvalError, sampler_settings, shard_documents
from llada_xp.loading import load_model
from llada_xp.sampler import Request, Sampler
from tests.test_eval import eval_py, wandb_runs

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"
QUESTIONS = [json.loads(line) for line in (TASKS / "demo.json").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo():
    return load_model(ModelConfig())


def chat(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def instances(contexts: list[str], gen_kwargs: dict) -> list[Instance]:
    return [Instance("generate_until", {}, (c, dict(gen_kwargs)), i, ("demo_gen", i, 1)) for i, c in enumerate(contexts)]


# --------------------------------------------------------------------------------------------------- adapter
@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.7, seed=5, threshold=None, steps=16)],
                         ids=["greedy", "sampled"])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_generate_until_gives_the_samplers_tokens(demo, settings, batch_size):
    tok = demo.tokenizer
    base = SamplerConfig(gen_length=32, block_length=8, **settings)
    contexts = [chat(tok, q["prompt"]) for q in QUESTIONS[:7]]
    lm = LladaLM(demo.model, tok, demo.info.ids, base, batch_size=batch_size)
    texts = lm.generate_until(instances(contexts, {"until": ["\n"], "max_gen_toks": 32}))
    got = {r["request"]: r["token_ids"] for r in lm.records}
    sampler = Sampler(demo.model, demo.info.ids, decode=tok.decode)
    for i, c in enumerate(contexts):
        ids = list(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i]["prompt"]}], tokenize=True,
                                           add_generation_prompt=True, return_dict=False))
        s = SamplerConfig(gen_length=32, block_length=8, **settings)
        s.stop = ["\n"]
        s.seed = None if s.seed is None else s.seed + i
        ref = sampler.generate([Request(ids, s)])[0]
        assert got[i] == ref.tokens
        assert texts[i] == ref.text
    if not settings:
        assert sum(t == q["answer"] for t, q in zip(texts, QUESTIONS)) >= 6


def test_requests_with_different_settings_decode_together_each_as_alone(demo):
    tok = demo.tokenizer
    base = SamplerConfig(gen_length=32, block_length=8)
    lm = LladaLM(demo.model, tok, demo.info.ids, base, batch_size=8)
    reqs = instances([chat(tok, q["prompt"]) for q in QUESTIONS[:4]], {"max_gen_toks": 32})
    reqs[1].arguments[1]["block_length"] = 16  # the running set lets rows differ in every setting
    texts = lm.generate_until(reqs)
    assert len({r["batch"] for r in lm.records}) == 1  # one continuous run, no batch per setting
    sampler = Sampler(demo.model, demo.info.ids, decode=tok.decode)
    for r in lm.records:
        i = r["request"]
        s = sampler_settings(base, reqs[i].args[1])
        alone = sampler.generate([Request(lm.encode(reqs[i].args[0]), s)])[0]
        assert (r["token_ids"], texts[i]) == (alone.tokens, alone.text)


def test_gen_kwargs_map_to_sampler_settings():
    base = SamplerConfig(gen_length=128, steps=64, temperature=0.5, stop=["Q:"])
    s = sampler_settings(base, {"until": ["\n\n", "Question:"], "max_gen_toks": 256, "do_sample": False,
                                "temperature": 0.9, "top_p": 1.0, "threshold": 0.7})
    assert (s.stop, s.gen_length, s.steps, s.temperature, s.threshold) == (["Q:", "\n\n", "Question:"], 256, 128,
                                                                          0.0, 0.7)
    assert sampler_settings(base, {"until": "END", "steps": 8, "max_gen_toks": 32}).stop == ["Q:", "END"]
    assert sampler_settings(base, {"max_gen_toks": 32, "steps": 8}).steps == 8
    assert sampler_settings(base, {"do_sample": True}).temperature == 0.5
    assert sampler_settings(base, {"temperature": 0.2}).temperature == 0.2
    assert base.stop == ["Q:"]  # not changed in place


@pytest.mark.parametrize("kwargs,name", [({"top_p": 0.9}, "top_p"), ({"top_k": 40}, "top_k"),
                                         ({"num_return_sequences": 2}, "num_return_sequences"),
                                         ({"do_sample": True, "temperature": 0}, "do_sample"),
                                         ({"threshold": 2.0}, "threshold")])
def test_a_gen_kwarg_we_cannot_honour_is_refused_by_name(kwargs, name):
    with pytest.raises(LmEvalError, match=name):
        sampler_settings(SamplerConfig(), kwargs)


def test_a_refused_gen_kwarg_names_the_task(demo):
    lm = LladaLM(demo.model, demo.tokenizer, demo.info.ids, SamplerConfig())
    with pytest.raises(LmEvalError, match="task demo_gen: generation kwarg 'typical_p'"):
        lm.generate_until(instances(["Add: 1 + 2"], {"typical_p": 0.5}))


def test_loglikelihood_rolling_is_refused_naming_the_task(demo):
    lm = LladaLM(demo.model, demo.tokenizer, demo.info.ids, SamplerConfig())
    req = Instance("loglikelihood_rolling", {}, ("some text",), 0, ("wikitext", 0, 1))
    with pytest.raises(LmEvalError, match="task wikitext needs loglikelihood_rolling"):
        lm.loglikelihood_rolling([req])


def test_the_context_trailing_whitespace_moves_to_the_continuation(demo):
    lm = LladaLM(demo.model, demo.tokenizer, demo.info.ids, SamplerConfig())
    ctx, cont = lm.encode_pair("Add: 19 + 1 ", "= 20")
    assert ctx == lm.encode("Add: 19 + 1") and ctx + cont == lm.encode("Add: 19 + 1 = 20")
    chat_ctx = chat(demo.tokenizer, "Add: 19 + 1")  # ends with "\n\n": scored as part of the answer
    ctx, cont = lm.encode_pair(chat_ctx, "19 + 1 = 20")
    assert ctx + cont == lm.encode(chat_ctx + "19 + 1 = 20") and ctx == lm.encode(chat_ctx.rstrip())


def test_loglikelihood_is_the_elbo_of_the_encoded_pair(demo):
    from llada_xp.likelihood import ELBO, is_greedy, log_likelihood

    elbo = ELBO(mc_num=8, batch_size=4, seed=3)
    lm = LladaLM(demo.model, demo.tokenizer, demo.info.ids, SamplerConfig(), elbo=elbo, check_greedy=True)
    q = QUESTIONS[1]
    ctx = chat(demo.tokenizer, q["prompt"])
    reqs = [Instance("loglikelihood", {}, (ctx, c + "<|eot_id|>"), i, ("demo_mc", 1, 1)) for i, c in enumerate(q["choices"])]
    got = lm.loglikelihood(reqs)
    for (ll, greedy), r in zip(got, reqs):
        prompt, answer = lm.encode_pair(*r.args)
        assert ll == log_likelihood(demo.model, demo.info.ids, prompt, answer, elbo)
        assert greedy == is_greedy(demo.model, demo.info.ids, prompt, answer)
    assert max(range(4), key=lambda i: got[i][0]) == q["label"]
    assert lm.likelihood == dict(loglikelihood_requests=4, loglikelihood_s=lm.likelihood["loglikelihood_s"],
                                 loglikelihood_forwards=8)
    lm.check_greedy = False
    assert [g for _, g in lm.loglikelihood(reqs)] == [False] * 4


# --------------------------------------------------------------------------------------------------- config
def test_lm_eval_options_are_refused_by_other_tasks():
    with pytest.raises(ConfigError, match="task.tasks is an option of task=lm_eval"):
        check(EvalConfig(task=TaskConfig(name="demo", tasks=["gsm8k"])))
    with pytest.raises(ConfigError, match="task.mc_num"):
        check(EvalConfig(task=TaskConfig(name="jsonl", mc_num=4)))


@pytest.mark.parametrize("task,match", [
    (dict(tasks=[]), "task.tasks is empty"),
    (dict(tasks=["x"], mc_num=12, mc_batch_size=8), "task.mc_num must be a multiple"),
    (dict(tasks=["x"], system_prompt="be brief"), "task.system_instruction"),
    (dict(tasks=["x"], num_fewshot=-1), "task.num_fewshot"),
])
def test_lm_eval_config_errors_name_the_key(task, match):
    with pytest.raises(ConfigError, match=match):
        check(EvalConfig(task=TaskConfig(name="lm_eval", **task)))


def test_shards_take_every_nth_document_in_order():
    parts = [shard_documents(10, k, 3) for k in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    check(EvalConfig(task=TaskConfig(name="lm_eval", tasks=["x"]), num_shards=2, shard_index=1))  # accepted


def test_a_task_max_gen_toks_over_gen_length_is_logged(demo, caplog):
    lm = LladaLM(demo.model, demo.tokenizer, demo.info.ids, SamplerConfig(gen_length=32, block_length=8))
    with caplog.at_level("WARNING", logger="llada_xp.lm_eval_adapter"):
        lm.generate_until(instances(["Add: 1 + 2"] * 2, {"max_gen_toks": 16}))
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "task demo_gen" in msg and "16 tokens, not sampler.gen_length=32" in msg
    caplog.clear()
    lm.generate_until(instances(["Add: 1 + 2"], {"max_gen_toks": 32}))
    assert not caplog.records


# --------------------------------------------------------------------------------------------------- eval.py
LM_EVAL_ARGS = ["task=lm_eval", f"task.include_path={TASKS}", "task.apply_chat_template=true", "progress=false",
                "sampler.gen_length=32", "sampler.block_length=8", "sampler.steps=32", "batch_size=8"]


@pytest.mark.slow
def test_generate_until_task_through_eval_py(tmp_path):
    out = tmp_path / "out"
    eval_py([*LM_EVAL_ARGS, "task.tasks=[demo_gen]", "task.limit=24", "logger=wandb", f"output_dir={out}"], tmp_path)
    m = json.loads((out / "metrics.json").read_text())
    for filt in ("whole", "lowercase"):  # both filters, each with its stderr
        assert m[f"demo_gen/exact_match/{filt}"] >= 0.9
        assert f"demo_gen/exact_match_stderr/{filt}" in m
    assert m["n"] == 24 and m["generation_requests"] == 24 and m["complete"]
    assert m["accuracy_metric"] == "demo_gen/exact_match/whole" and m["accuracy"] == m["demo_gen/exact_match/whole"]
    assert m["tokens_per_s"] > 0 and m["nfe_mean"] >= 1 and m["tokens_per_forward_total"] > 0
    assert m["lm_eval"]["n_samples"]["demo_gen"]["effective"] == 24
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 48 and {s["filter"] for s in samples} == {"whole", "lowercase"}
    first = next(s for s in samples if s["index"] == 0 and s["filter"] == "whole")
    assert QUESTIONS[0]["prompt"] in first["prompt"] and first["target"] == QUESTIONS[0]["answer"]
    assert first["metrics"]["exact_match"] == float(first["output"] == first["target"])
    (run,) = wandb_runs(tmp_path)
    assert run["exit"] == 0
    assert run["history"]["demo_gen/exact_match/whole"] == m["demo_gen/exact_match/whole"]
    assert run["history"]["tokens_per_s"] == m["tokens_per_s"]


@pytest.mark.slow
def test_a_multirun_reports_every_filter_as_a_column(tmp_path):
    import csv

    sweep = tmp_path / "sweep"
    eval_py(["-m", *LM_EVAL_ARGS, "task.tasks=[demo_gen]", "task.limit=8", "logger=wandb",
             "sampler.threshold=0.5,0.9", f"hydra.sweep.dir={sweep}"], tmp_path)
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [r["sampler.threshold"] for r in rows] == ["0.5", "0.9"]
    for r in rows:
        assert float(r["demo_gen/exact_match/whole"]) == float(r["accuracy"]) >= 0.5
        assert r["demo_gen/exact_match/lowercase"] and float(r["tokens_per_s"]) > 0
    assert "demo_gen/exact_match/lowercase" in (sweep / "report.md").read_text()
    runs = wandb_runs(tmp_path)
    assert sorted(r["job_type"] for r in runs) == ["eval", "eval", "report"] and all(r["exit"] == 0 for r in runs)
    (rep,) = [r for r in runs if r["job_type"] == "report"]
    (table,) = rep["dir"].glob("files/media/table/sweep_*.table.json")
    assert "demo_gen/exact_match/lowercase" in json.loads(table.read_text())["columns"]


@pytest.mark.slow
def test_a_rerun_resumes_from_the_request_cache(tmp_path):
    out = tmp_path / "out"
    args = [*LM_EVAL_ARGS, "task.tasks=[demo_gen,demo_mc]", "task.limit=4", "task.mc_num=8", f"output_dir={out}"]
    eval_py(args, tmp_path)
    first = json.loads((out / "metrics.json").read_text())
    assert first["resumed"] == 0 and first["generation_requests"] == 4 and first["loglikelihood_requests"] == 16
    eval_py(args, tmp_path)
    again = json.loads((out / "metrics.json").read_text())
    assert again["resumed"] == 20 and again["generation_requests"] == 0 and "loglikelihood_requests" not in again
    assert {k: v for k, v in again.items() if "/" in k} == {k: v for k, v in first.items() if "/" in k}
    p = eval_py([*args, "sampler.threshold=0.5"], tmp_path, check=False)
    assert p.returncode == 1 and "request cache of another configuration" in p.stdout + p.stderr
    eval_py([*args, "sampler.threshold=0.5", "resume=false"], tmp_path)
    assert json.loads((out / "metrics.json").read_text())["resumed"] == 0


@pytest.mark.slow
def test_multiple_choice_task_ranks_the_right_answer_by_elbo_through_eval_py(tmp_path):
    out = tmp_path / "out"
    eval_py([*LM_EVAL_ARGS, "task.tasks=[demo_mc]", "task.mc_num=8", "task.mc_batch_size=8",
             "metric=demo_mc/acc/none", f"output_dir={out}"], tmp_path)
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 100 and m["demo_mc/acc/none"] >= 0.9 and "demo_mc/acc_stderr/none" in m
    assert m["loglikelihood_requests"] == 400 and m["loglikelihood_forwards"] == 400
    assert "generation_requests" in m and m["generation_requests"] == 0 and "tokens_per_s" not in m
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 100 and all(len(s["output"]) == 4 for s in samples)
    assert [s["target"] for s in sorted(samples, key=lambda s: s["index"])] == [q["label"] for q in QUESTIONS]


@pytest.mark.slow
def test_a_dataset_not_cached_offline_is_named(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hub_task.yaml").write_text(
        "task: not_cached_task\ndataset_path: llada-xp-tests/no-such-dataset\noutput_type: generate_until\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\nmetric_list:\n  - metric: exact_match\n")
    args = [a for a in LM_EVAL_ARGS if not a.startswith("task.include_path=")]
    p = eval_py([*args, "task.tasks=[not_cached_task]", f"task.include_path={tmp_path / 'tasks'}",
                 f"output_dir={tmp_path / 'out'}"], tmp_path, extra_env={"HF_DATASETS_OFFLINE": "1"}, check=False)
    assert p.returncode == 1
    assert "llada-xp-tests/no-such-dataset" in p.stdout + p.stderr and "not available offline" in p.stdout + p.stderr


@pytest.mark.slow
def test_an_unknown_task_is_named(tmp_path):
    p = eval_py([*LM_EVAL_ARGS, "task.tasks=[demo_gem]", f"output_dir={tmp_path / 'out'}"], tmp_path, check=False)
    err = p.stdout + p.stderr
    assert p.returncode == 1 and "unknown lm-eval task demo_gem" in err and "did you mean demo_gen" in err


# --------------------------------------------------------------------------------------------------- shards
def task_folder(tmp: Path) -> Path:
    """Variants of the demo tasks with corpus-level metrics (bleu, whose stderr lm-eval bootstraps; brier_score,
    whose per-document values are numpy arrays: no exact JSON form), a few-shot task (lm-eval draws its examples
    document after document from one generator) and a group of the two generate_until tasks."""
    d = tmp / "tasks"
    d.mkdir()
    (d / "demo_utils.py").write_text((TASKS / "demo_utils.py").read_text())
    data = str(TASKS / "demo.json")
    gen = (TASKS / "demo_gen.yaml").read_text().replace("tests/data/lm_eval/demo.json", data)
    metrics = lambda pairs: "".join(f"  - metric: {m}\n    aggregation: {a}\n    higher_is_better: true\n"
                                    for m, a in pairs) + "metadata:"  # appended to the metric_list
    (d / "corpus_gen.yaml").write_text(gen.replace("task: demo_gen", "task: corpus_gen").replace(
        "metadata:", metrics([("bleu", "bleu")])))
    (d / "fewshot_gen.yaml").write_text(gen.replace("task: demo_gen", "task: fewshot_gen") + "num_fewshot: 1\n")
    (d / "gen_group.yaml").write_text("group: gen_group\ntask: [corpus_gen, fewshot_gen]\naggregate_metric_list:\n"
                                      "  - metric: exact_match\n    weight_by_size: true\nmetadata:\n  version: 1.0\n")
    mc = (TASKS / "demo_mc.yaml").read_text().replace("tests/data/lm_eval/demo.json", data)
    (d / "corpus_mc.yaml").write_text(mc.replace("task: demo_mc", "task: corpus_mc").replace(
        "metadata:", metrics([("brier_score", "brier_score")])))
    return d


def lm_eval_cfg(out: Path, tasks: list[str], folder: Path, **kw) -> EvalConfig:
    task = dict(name="lm_eval", tasks=tasks, include_path=str(folder), apply_chat_template=True, mc_num=8,
                **kw.pop("task", {}))
    return EvalConfig(task=TaskConfig(**task), output_dir=str(out), progress=False, batch_size=4, resume=False,
                      sampler=SamplerConfig(gen_length=32, block_length=8, steps=32, **kw.pop("sampler", {})), **kw)


def lm_eval_numbers(m: dict) -> dict:
    return {k: v for k, v in m.items() if "/" in k or k in ("accuracy", "accuracy_metric", "n")}


def stable_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("tasks,shards,settings,not_merged", [
    (["gen_group"], 3, dict(sampler=dict(temperature=0.9, seed=5, threshold=None), task=dict(limit=14)),
     []),
    (["corpus_mc"], 2, dict(task=dict(limit=30)), ["corpus_mc/brier_score/none"]),
], ids=["generate_until", "multiple_choice"])
def test_shards_merge_to_exactly_the_unsharded_metrics(tasks, shards, settings, not_merged, tmp_path, monkeypatch):
    from llada_xp.evaluate import GENERATIONS, merge, read_samples, run

    monkeypatch.setenv("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap in-process: the same draws, no pool to start
    folder = task_folder(tmp_path)
    whole = run(lm_eval_cfg(tmp_path / "whole", tasks, folder, **settings))
    parts = [run(lm_eval_cfg(tmp_path / f"s{k}", tasks, folder, shard_index=k, num_shards=shards, **settings))
             for k in range(shards)]
    limit = settings["task"]["limit"]
    n_tasks = len(whole["lm_eval"]["documents"])
    assert [p["n"] for p in parts] == [len(shard_documents(limit, k, shards)) * n_tasks for k in range(shards)]
    assert all(p["shard"] == dict(index=k, num_shards=shards) for k, p in enumerate(parts))
    merged = merge([tmp_path / f"s{k}" for k in reversed(range(shards))], tmp_path / "merged")
    numbers = lm_eval_numbers(whole)
    assert len([k for k in numbers if "/" in k]) >= 3 and len({v for k, v in numbers.items() if "/" in k}) > 2
    assert all(k in numbers for k in not_merged)
    # exactly: corpus metrics, bootstrapped stderr and all; a metric that cannot be merged exactly is named, no number
    assert lm_eval_numbers(merged) == {k: v for k, v in numbers.items() if k not in not_merged}
    assert sorted(merged["lm_eval"]["not_merged"]) == not_merged
    assert merged["lm_eval"]["n_shot"] == whole["lm_eval"]["n_shot"]
    assert stable_samples(tmp_path / "merged" / "samples.jsonl") == stable_samples(tmp_path / "whole" / "samples.jsonl")
    for key in ("generation_requests", "nfe_total", "generated_tokens", "tokens_per_forward_total",
                "loglikelihood_requests", "loglikelihood_forwards"):
        assert merged.get(key) == whole.get(key), key
    if "gen_group" in tasks:  # the group's score; the sampled tokens: every request drew from its unsharded seed
        assert {"gen_group/exact_match/whole", "gen_group/exact_match_stderr/whole", "corpus_gen/bleu/whole",
                "corpus_gen/bleu_stderr/whole", "fewshot_gen/exact_match/lowercase"} <= set(merged)
        tokens = lambda d: sorted((g["task"], g["doc_id"], g["token_ids"]) for g in read_samples(d / GENERATIONS))
        assert tokens(tmp_path / "whole") == sorted(t for k in range(shards) for t in tokens(tmp_path / f"s{k}"))
    # a rerun of a shard resumes from its request cache, to the same numbers
    again = run(dataclasses.replace(lm_eval_cfg(tmp_path / "s1", tasks, folder, shard_index=1, num_shards=shards,
                                                **settings), resume=True))
    assert again["resumed"] > 0 and lm_eval_numbers(again) == lm_eval_numbers(parts[1])
    assert again.get("generation_requests") == 0


@pytest.mark.slow
def test_a_task_with_fewer_documents_than_shards_is_named(tmp_path):
    from llada_xp.evaluate import run

    cfg = lm_eval_cfg(tmp_path / "s2", ["demo_gen"], TASKS, task=dict(limit=2), shard_index=2, num_shards=3)
    with pytest.raises(LmEvalError, match="task demo_gen has 2 documents, fewer than num_shards=3"):
        run(cfg)


@pytest.mark.slow
def test_lm_eval_shards_through_eval_py_are_one_merged_report_point(tmp_path):
    import csv

    sweep = tmp_path / "sweep"
    args = [*LM_EVAL_ARGS, "task.tasks=[demo_gen]", "task.limit=10", "logger=wandb"]
    eval_py(["-m", *args, "num_shards=2", "shard_index=0,1", f"hydra.sweep.dir={sweep}"], tmp_path)
    shards = [json.loads((sweep / k / "metrics.json").read_text()) for k in ("0", "1")]
    assert [m["n"] for m in shards] == [5, 5] and [m["shard"]["index"] for m in shards] == [0, 1]
    (point,) = csv.DictReader(open(sweep / "report.csv"))
    assert point["point"] == "0+1" and point["n"] == "10"
    from llada_xp.evaluate import main as evaluate_cli

    evaluate_cli(["merge", str(sweep / "0"), str(sweep / "1"), "--out", str(tmp_path / "merged")])
    merged = json.loads((tmp_path / "merged" / "metrics.json").read_text())
    for key in ("demo_gen/exact_match/whole", "demo_gen/exact_match/lowercase", "accuracy"):
        assert float(point[key]) == pytest.approx(merged[key], abs=1e-4), key  # the report prints 4 decimals
    assert merged["demo_gen/exact_match/whole"] == sum(
        s["metrics"]["exact_match"] for s in stable_samples(tmp_path / "merged" / "samples.jsonl")
        if s["filter"] == "whole") / 10
    runs = wandb_runs(tmp_path)
    assert sorted(r["job_type"] for r in runs) == ["eval", "eval", "report"] and all(r["exit"] == 0 for r in runs)
    (rep,) = [r for r in runs if r["job_type"] == "report"]
    (table,) = rep["dir"].glob("files/media/table/sweep_*.table.json")
    table = json.loads(table.read_text())
    row = dict(zip(table["columns"], table["data"][0]))
    assert len(table["data"]) == 1 and row["demo_gen/exact_match/whole"] == merged["demo_gen/exact_match/whole"]
