"""The demo task, its tokenizer and the bundled demo model's files (CPU, seconds)."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llada_xp.demo import task
from llada_xp.demo.task import HELD_OUT_SEED, SKILLS, TRAIN_SEED, examples, held_out_prompts, score
from llada_xp.demo.tokenizer import SPECIAL_TOKENS, build_tokenizer

MODEL_DIR = Path(task.__file__).parent / "model"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# --- task -----------------------------------------------------------------------------------------------------------

def test_examples_are_deterministic_per_seed():
    assert examples(200, 7) == examples(200, 7)
    assert examples(200, 7) != examples(200, 8)


def test_examples_cover_every_skill():
    assert {e.skill for e in examples(200, TRAIN_SEED)} == set(SKILLS)


def test_held_out_seed_differs_and_training_never_sees_held_out_prompts():
    assert HELD_OUT_SEED != TRAIN_SEED
    held = held_out_prompts()
    train = examples(3000, TRAIN_SEED, exclude=held)
    assert not {e.prompt for e in train} & held
    assert all(e.prompt in held for e in examples(100, HELD_OUT_SEED))


def test_answers_are_correct():
    for e in examples(500, 3):
        items = e.prompt.split(": ", 1)[1]
        if e.skill in ("add", "subtract"):
            a, op, b = items.split()
            assert e.answer == f"{items} = {int(a) + int(b) if op == '+' else int(a) - int(b)}"
        else:
            xs = items.split()
            assert len(set(xs)) == len(xs) >= 3
            assert e.answer.split(", ") == sorted(xs, reverse=e.skill == "sort_descending")


def test_answers_vary_in_length(tok):
    lengths = [len(tok.encode(e.answer)) for e in examples(2000, 5)]
    assert min(lengths) == 5 and max(lengths) == 23  # 3 to 12 sorted items; with block_length 8 or 16, several blocks


def test_score_is_exact_match_after_stripping():
    assert score(" a b c\n", "a b c")
    assert score("a b c", " a b c ")
    assert not score("a b  c", "a b c")
    assert not score("A b c", "a b c")
    assert not score("a b", "a b c")
    assert not score("", "a")


# --- tokenizer ------------------------------------------------------------------------------------------------------

def test_every_skill_round_trips_exactly_and_answers_fit_the_canvas(tok):
    lengths = {s: [] for s in SKILLS}
    for e in examples(2000, 11):
        for text in (e.prompt, e.answer):
            assert tok.decode(tok.encode(text)) == text
        lengths[e.skill].append(len(tok.encode(e.answer)))
    assert all(lengths.values())
    assert max(max(v) for v in lengths.values()) <= 63  # + <|eot_id|> fits 64 generation columns
    assert min(min(v) for v in lengths.values()) >= 3


def test_spaced_items_are_one_token_each(tok):
    assert tok.convert_ids_to_tokens(tok.encode("a b c d")) == ["a", "Ġb", "Ġc", "Ġd"]
    assert tok.decode(tok.encode("  x\n\ny é")) == "  x\n\ny é"


def test_special_tokens_have_llada_names_and_roles_and_stay_whole(tok):
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.mask_token) == (
        "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|mdm_mask|>")
    assert tok.pad_token_id == tok.eos_token_id
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    assert SPECIAL_TOKENS == ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>",
                              "<|end_header_id|>", "<|eot_id|>"]
    ids = tok.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert len(set(ids)) == len(ids)
    assert tok.encode("x" + "".join(SPECIAL_TOKENS) + " y") == [tok.convert_tokens_to_ids("x")] + ids + [
        tok.convert_tokens_to_ids("Ġy")]
    assert tok.encode("a b") == tok.encode("a b", add_special_tokens=True)  # add_bos / add_eos are off


def test_chat_template_is_llada_format(tok):
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "\nSort: d a c b"}]
    expected = ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nSort: d a c b<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == tok.encode(expected)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_tokenizer_saves_and_loads_offline(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").exists()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "Copy: red sun"}]
    for t in ("Copy: red sun", "a b c", "".join(SPECIAL_TOKENS)):
        assert loaded.encode(t) == tok.encode(t)
    assert loaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (loaded.mask_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (
        tok.mask_token_id, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)


# --- training and the bundled model ---------------------------------------------------------------------------------

def test_training_is_deterministic_per_seed(tmp_path):
    from llada_xp.demo.train import parse_args, train

    def run(out):
        train(parse_args(["--steps", "2", "--batch-size", "4", "--d-model", "32", "--n-heads", "2", "--n-layers", "1",
                          "--mlp", "64", "--final-n", "0", "--eval-every", "0", "--warmup", "1", "--out", str(out)]))
        return json.loads((out / "training.json").read_text())

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert a["final_loss_ema"] == b["final_loss_ema"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_bundled_model_is_small_and_its_ids_are_the_tokenizers():
    import llada_xp  # noqa: F401  (registers model_type "llada")
    from transformers import AutoConfig

    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) <= 20 * 2**20
    config = AutoConfig.from_pretrained(MODEL_DIR)
    loaded = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert (config.mask_token_id, config.eos_token_id, config.pad_token_id) == (
        loaded.mask_token_id, loaded.eos_token_id, loaded.pad_token_id)
    assert config.max_sequence_length >= 256 and config.vocab_size >= len(loaded)
    assert json.loads((MODEL_DIR / "training.json").read_text())["seed"] == TRAIN_SEED


def test_bundled_model_solves_its_held_out_task():
    """Issue #4's bar on 200 held-out examples: >= 90% with the reference sampler; dual cache + threshold 0.9 within
    3 points at >= 2 tokens per forward; and >= 90% on the servers' default canvas. (The README quotes the 500-example
    figures from training.json.)"""
    from llada_xp.config import ModelConfig
    from llada_xp.demo.check import accuracy
    from llada_xp.demo.train import final_settings
    from llada_xp.loading import load_model

    loaded = load_model(ModelConfig(source="demo"))
    settings = final_settings()
    ref = accuracy(loaded.model, loaded.tokenizer, settings["reference"], n=200)
    fast = accuracy(loaded.model, loaded.tokenizer, settings["dual_threshold_0_9"], n=200)
    assert ref["accuracy"] >= 0.9, ref
    assert fast["accuracy"] >= ref["accuracy"] - 0.03 and fast["tokens_per_forward"] >= 2, fast
    assert min(ref["per_skill"].values()) >= 0.8, ref  # every skill learnt, not just the easy ones
    served = accuracy(loaded.model, loaded.tokenizer, settings["dual_threshold_0_9_gen128"], n=200)
    assert served["accuracy"] >= 0.9, served  # the 128-column canvas of serve.py's and eval.py's defaults


def test_saved_tokenizer_config_is_the_bundled_one_and_names_a_class_every_transformers_has(tmp_path):
    from llada_xp.demo.tokenizer import save_tokenizer

    save_tokenizer(build_tokenizer(), tmp_path)
    written = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in written
    bundled = Path(__file__).resolve().parents[1] / "llada_xp" / "demo" / "model" / "tokenizer_config.json"
    assert written == json.loads(bundled.read_text())
