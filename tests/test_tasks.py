"""Evaluation tasks: answer extraction, jsonl (also over a local copy of GSM8K), demo, and task=gsm8k as lm-eval's
gsm8k (CPU, offline)."""

import json

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from llada_xp.config import ConfigError, EvalConfig, TaskConfig, load as load_config, register
from llada_xp.demo import task as demo
from llada_xp.tasks import TaskError, extract_number, load, numbers_equal
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
# GSM8K's format: "question", and "answer" = a worked solution with <<calculator>> notes ending in "#### N".
TEST = [
    {"question": "Ann reads 12 pages a day for 3 days. How many pages?", "answer": "12 * 3 = <<12*3=36>>36\n#### 36"},
    {"question": "Half of 5 liters?", "answer": "5 / 2 = <<5/2=2.5>>2.5\n#### 2.5"},
    {"question": "Bob earns $1,500 a week. What does he earn in 2 weeks?", "answer": "#### 3,000"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


@pytest.fixture
def gsm8k_jsonl(tmp_path):
    return write_jsonl(tmp_path / "test.jsonl", TEST)


def composed(*overrides: str) -> EvalConfig:
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return load_config(compose("eval", overrides=list(overrides)), EvalConfig)


# --- answer extraction ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, number", [
    ("He has 7 apples.\n#### 7", "7"),
    ("#### 1,000", "1000"),  # thousands comma
    ("The shirt costs $1,234.", "1234"),  # dollar sign, comma, trailing period
    ("#### -$7", "-7"),  # negative money
    ("It got colder: -3 degrees", "-3"),  # negative
    ("Half of it is 2.5 liters.", "2.5"),  # decimal, trailing period
    ("Total 1,234,567.89 units", "1234567.89"),
    ("pages 3-5", "5"),  # a range's dash is not a minus sign
    ("First 12, then 36.\n#### 36\nCheck: 12 * 3 = 36, not 40", "36"),  # "####" wins over the last number
    ("no number here", None),
    ("####", None),
    ("", None),
])
def test_extract_number_handles_gsm8k_edge_cases(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize("output, reference, ok", [
    ("so the answer is 18.00", "#### 18", True),  # numerically equal
    ("The answer is $3,000.", "#### 3,000", True),
    ("-3", "5 - 8 = -3\n#### -3", True),
    ("3", "#### -3", False),
    ("I don't know", "#### 7", False),  # no number is wrong, never an error
    ("7", "no reference number", False),
])
def test_numbers_equal_compares_extracted_numbers(output, reference, ok):
    assert numbers_equal(output, reference) is ok


# --- gsm8k: lm-eval's task; a local copy through jsonl -------------------------------------------------------------

def test_task_gsm8k_is_lm_evals_gsm8k_five_shot_with_the_chat_template():
    t = composed("task=gsm8k").task
    assert (t.name, t.tasks, t.num_fewshot, t.apply_chat_template, t.fewshot_as_multiturn) == (
        "lm_eval", ["gsm8k"], 5, True, True)
    assert t.limit is None and t.gen_kwargs == {} and t.include_path is None
    base = composed("task=gsm8k", "task.apply_chat_template=false", "task.limit=2").task
    assert (base.apply_chat_template, base.limit, base.tasks) == (False, 2, ["gsm8k"])


@pytest.mark.parametrize("override, instead", [
    ("task.path=/data/gsm8k", "task.include_path"),
    ("task.chat=false", "task.apply_chat_template"),
    ("task.scoring=number", "task.include_path"),
    ("task.stop=[Question:]", "task.gen_kwargs"),
])
def test_options_of_the_former_gsm8k_task_are_refused_naming_lm_evals(override, instead):
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]} is not used by task=lm_eval; use .*{instead}"):
        composed("task=gsm8k", override)


def test_num_fewshot_is_refused_by_the_built_in_tasks(gsm8k_jsonl):
    with pytest.raises(ConfigError, match="task.num_fewshot is an option of task=lm_eval; task=jsonl does not use it"):
        composed("task=jsonl", f"task.path={gsm8k_jsonl}", "task.num_fewshot=5")


def test_a_local_gsm8k_jsonl_runs_as_jsonl_scored_by_final_number(gsm8k_jsonl):
    # the README's command
    t = load(composed("task=jsonl", f"task.path={gsm8k_jsonl}", "task.prompt_field=question", "task.scoring=number",
                      "task.limit=2").task)
    assert [(e.index, e.question, e.reference) for e in t.examples] == [
        (i, r["question"], r["answer"]) for i, r in enumerate(TEST[:2])]
    refs = [r["answer"] for r in TEST]
    assert t.score("12 * 3 = 36. The answer is 36.", refs[0])
    assert t.score("#### 2.50", refs[1])
    assert t.score("He earns $3,000.", refs[2])
    assert not t.score("He earns $1,500 a week.", refs[2])


def test_chat_prompt_is_the_tokenizers_chat_template_over_the_templated_question(gsm8k_jsonl):
    tok = tiny.tokenizer()
    t = load(TaskConfig(name="jsonl", path=str(gsm8k_jsonl), prompt_field="question", system_prompt="Be brief.",
                        prompt_template="Question: {prompt}\nAnswer:"))
    ids = t.prompt_ids(t.examples[0], tok)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Question: {TEST[0]['question']}\nAnswer:"}]
    assert t.messages(t.examples[0]) == msgs
    assert ids == tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)


def test_plain_prompt_for_base_models_is_the_templated_question(gsm8k_jsonl):
    tok = tiny.tokenizer()
    t = load(TaskConfig(name="jsonl", path=str(gsm8k_jsonl), prompt_field="question", chat=False,
                        prompt_template="Question: {prompt}\nAnswer:"))
    assert t.prompt(t.examples[0]) == f"Question: {TEST[0]['question']}\nAnswer:"
    assert t.prompt_ids(t.examples[0], tok) == tok(t.prompt(t.examples[0]))["input_ids"]


# --- jsonl and demo -------------------------------------------------------------------------------------------------

def test_jsonl_task_reads_prompt_answer_lines_and_scores_exactly(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Say hi", "answer": "hi"}, {"prompt": "Say yo", "answer": "yo"}])
    t = load(TaskConfig(name="jsonl", path=str(p), limit=1))
    assert [(e.index, e.question, e.reference) for e in t.examples] == [(0, "Say hi", "hi")]
    assert t.score(" hi\n", "hi") and not t.score("hi there", "hi")
    assert load(TaskConfig(name="jsonl", path=str(p), scoring="number")).score("it is 7", "7")


def test_jsonl_task_errors_name_the_file_or_setting(tmp_path):
    with pytest.raises(TaskError, match="task file not found"):
        load(TaskConfig(name="jsonl", path=str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\nnot json\n')
    with pytest.raises(TaskError, match="bad.jsonl:2"):
        load(TaskConfig(name="jsonl", path=str(bad)))
    with pytest.raises(TaskError, match="task.scoring"):
        load(TaskConfig(name="jsonl", path=str(write_jsonl(tmp_path / "ok.jsonl", [])), scoring="fuzzy"))
    with pytest.raises(TaskError, match="row 0 has no field 'prompt'.*task.prompt_field"):
        load(TaskConfig(name="jsonl", path=str(write_jsonl(tmp_path / "q.jsonl", [{"question": "x", "answer": "1"}]))))
    with pytest.raises(TaskError, match="task.name"):
        load(TaskConfig(name="mmlu"))
    with pytest.raises(TaskError, match=r"task.name must be demo or jsonl \(lm-eval's tasks: task=lm_eval\)"):
        load(TaskConfig(name="gsm8k"))  # conf/task/gsm8k.yaml composes to name=lm_eval
    with pytest.raises(TaskError, match="task.path is required"):
        load(TaskConfig(name="jsonl"))


def test_demo_task_is_the_demo_models_held_out_set():
    t = load(TaskConfig(name="demo", limit=30))
    expected = demo.examples(30, demo.HELD_OUT_SEED)
    assert [(e.question, e.reference) for e in t.examples] == [(e.prompt, e.answer) for e in expected]
    assert t.score is demo.score
    with pytest.raises(TaskError, match="exceeds the demo held-out set"):
        load(TaskConfig(name="demo", limit=demo.HELD_OUT_SIZE + 1))
