"""task=lm_eval: lm-evaluation-harness tasks through our sampler (lm_eval_adapter.py), offline.

The tasks are custom lm-eval YAMLs over tests/data/lm_eval/demo.json (100 held-out demo questions, each with its
answer and three near misses): demo_gen (generate_until, exact match under two filters) and demo_mc
(multiple_choice, by the Monte-Carlo ELBO). The data_files paths are relative to the repository root.
"""

import json
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance

from llada_xp.config import ConfigError, EvalConfig, ModelConfig, SamplerConfig, TaskConfig, check
from llada_xp.lm_eval_adapter import LladaLM, LmEvalError, sampler_settings
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


def test_requests_with_different_settings_go_to_different_batches(demo):
    tok = demo.tokenizer
    lm = LladaLM(demo.model, tok, demo.info.ids, SamplerConfig(gen_length=32, block_length=8), batch_size=8)
    reqs = instances([chat(tok, q["prompt"]) for q in QUESTIONS[:4]], {"max_gen_toks": 32})
    reqs[1].arguments[1]["block_length"] = 16  # a setting a batch must share
    lm.generate_until(reqs)
    batches = {}
    for r in lm.records:
        batches.setdefault(r["batch"], set()).add(r["request"])
    assert sorted(map(sorted, batches.values())) == [[0, 2, 3], [1]]


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


def test_shards_are_refused_for_lm_eval():
    with pytest.raises(ConfigError, match="num_shards > 1 is not supported with task=lm_eval"):
        check(EvalConfig(task=TaskConfig(name="lm_eval", tasks=["x"]), num_shards=2, shard_index=1))


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
