"""Evaluation tasks: answer extraction, the gsm8k task on local files in GSM8K's format, jsonl, demo (CPU, offline)."""

import json

import pandas as pd
import pytest

from llada_xp.config import TaskConfig
from llada_xp.demo import task as demo
from llada_xp.tasks import TaskError, extract_number, load, numbers_equal
from tests import tiny

# GSM8K's format: "question", and "answer" = a worked solution with <<calculator>> notes ending in "#### N".
TRAIN = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A shirt costs $1,200 and is discounted by $200. What does it cost?",
     "answer": "It costs 1,200 - 200 = <<1200-200=1000>>1,000 dollars.\n#### 1,000"},
    {"question": "It was 5 degrees and fell by 8. What is the temperature?",
     "answer": "5 - 8 = <<5-8=-3>>-3\n#### -3"},
]
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
def gsm8k_files(tmp_path):
    return write_jsonl(tmp_path / "test.jsonl", TEST), write_jsonl(tmp_path / "train.jsonl", TRAIN)


def gsm8k_cfg(**kw) -> TaskConfig:
    base = dict(name="gsm8k", subset="main", num_fewshot=2, chat=True, prompt_template="Question: {prompt}\nAnswer:",
                prompt_field="question", answer_field="answer", scoring="number")
    return TaskConfig(**{**base, **kw})


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


# --- gsm8k ----------------------------------------------------------------------------------------------------------

def test_gsm8k_loads_local_jsonl_with_k_shot_from_train_and_a_limit(gsm8k_files):
    test, train = gsm8k_files
    t = load(gsm8k_cfg(path=str(test), fewshot_path=str(train), limit=2))
    assert [e.question for e in t.examples] == [r["question"] for r in TEST[:2]]
    assert [e.index for e in t.examples] == [0, 1]
    assert len(t.shots) == 2 and all((q, a) in [(r["question"], r["answer"]) for r in TRAIN] for q, a in t.shots)
    assert t.shots == load(gsm8k_cfg(path=str(test), fewshot_path=str(train))).shots  # the seed fixes the shots
    msgs = t.messages(t.examples[0])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[-1]["content"] == f"Question: {TEST[0]['question']}\nAnswer:"
    assert msgs[1]["content"] == t.shots[0][1]


def test_gsm8k_loads_a_local_copy_of_the_hub_layout_and_parquet(tmp_path):
    (tmp_path / "gsm8k" / "main").mkdir(parents=True)
    pd.DataFrame(TEST).to_parquet(tmp_path / "gsm8k" / "main" / "test-00000-of-00001.parquet")
    pd.DataFrame(TRAIN).to_parquet(tmp_path / "gsm8k" / "main" / "train-00000-of-00001.parquet")
    t = load(gsm8k_cfg(path=str(tmp_path / "gsm8k"), num_fewshot=3))
    assert [e.reference for e in t.examples] == [r["answer"] for r in TEST]
    assert sorted(q for q, _ in t.shots) == sorted(r["question"] for r in TRAIN)


def test_gsm8k_scores_by_final_number(gsm8k_files):
    t = load(gsm8k_cfg(path=str(gsm8k_files[0]), num_fewshot=0))
    refs = [e.reference for e in t.examples]
    assert t.score("12 * 3 = 36. The answer is 36.", refs[0])
    assert t.score("#### 2.50", refs[1])
    assert t.score("He earns $3,000.", refs[2])
    assert not t.score("He earns $1,500 a week.", refs[2])


def test_gsm8k_chat_prompt_uses_the_tokenizer_chat_template(gsm8k_files):
    tok = tiny.tokenizer()
    t = load(gsm8k_cfg(path=str(gsm8k_files[0]), fewshot_path=str(gsm8k_files[1]), num_fewshot=1))
    ids = t.prompt_ids(t.examples[0], tok)
    assert ids == tok.apply_chat_template(t.messages(t.examples[0]), tokenize=True, add_generation_prompt=True,
                                          return_dict=False)
    text = tok.decode(ids)
    assert text.count("<|start_header_id|>") == 4 and text.endswith("<|end_header_id|>")


def test_plain_prompt_for_base_models_joins_shots_and_question(gsm8k_files):
    t = load(gsm8k_cfg(path=str(gsm8k_files[0]), fewshot_path=str(gsm8k_files[1]), num_fewshot=1, chat=False))
    q, a = t.shots[0]
    assert t.text(t.examples[0]) == f"Question: {q}\nAnswer: {a}\n\nQuestion: {TEST[0]['question']}\nAnswer:"
    assert t.prompt(t.examples[0]) == t.text(t.examples[0])


def test_gsm8k_errors_name_the_problem(gsm8k_files, tmp_path):
    test, train = gsm8k_files
    with pytest.raises(TaskError, match="num_fewshot=5 but the k-shot pool has 3"):
        load(gsm8k_cfg(path=str(test), fewshot_path=str(train), num_fewshot=5))
    with pytest.raises(TaskError, match="no field 'question'"):
        load(gsm8k_cfg(path=str(write_jsonl(tmp_path / "bad.jsonl", [{"q": "x", "answer": "1"}])), num_fewshot=0))
    with pytest.raises(TaskError, match="no network"):
        load(gsm8k_cfg(path="openai/gsm8k", num_fewshot=0))  # HF_HUB_OFFLINE=1


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
    with pytest.raises(TaskError, match="task.name"):
        load(TaskConfig(name="mmlu"))
    with pytest.raises(TaskError, match="task.path is required"):
        load(TaskConfig(name="jsonl"))


def test_demo_task_is_the_demo_models_held_out_set():
    t = load(TaskConfig(name="demo", limit=30))
    expected = demo.examples(30, demo.HELD_OUT_SEED)
    assert [(e.question, e.reference) for e in t.examples] == [(e.prompt, e.answer) for e in expected]
    assert t.score is demo.score
    with pytest.raises(TaskError, match="exceeds the demo held-out set"):
        load(TaskConfig(name="demo", limit=demo.HELD_OUT_SIZE + 1))
