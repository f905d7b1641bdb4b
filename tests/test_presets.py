"""The reproduction presets (conf/experiment/) compose with eval.py's config, pass its checks, and hold the published
settings: the tables below are written from reference/likelihood.md and reference/sampling.md, not from the YAMLs.
Composes only; nothing is loaded or run."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from llada_xp import resolvers
from llada_xp.config import EvalConfig, load, register

ROOT = Path(__file__).resolve().parents[1]
INSTRUCT, BASE = "GSAI-ML/LLaDA-8B-Instruct", "GSAI-ML/LLaDA-8B-Base"

# Generation presets: model, lm-eval tasks, k-shot, gen_length, block_length, steps, (logits_eos_inf,
# confidence_eos_eot_inf), and the (cache, threshold) of the single run, or of the sweep's base point
GENERATION = {
    # Fast-dLLM v1 README / eval_gsm8k.sh: 5-shot, gen 256, block 32, steps = gen_length, threshold 0.9
    "fast_dllm_gsm8k": (INSTRUCT, ["gsm8k"], 5, 256, 32, 256, (False, False), "none", None),
    # Fast-dLLM v1 README / eval_humaneval.sh: 0-shot, gen 256, block 32
    "fast_dllm_humaneval": (INSTRUCT, ["humaneval_instruct"], 0, 256, 32, 256, (False, False), "none", None),
    # LLaDA EVAL.md: GSM8K gen 256 / block 8 and MATH gen 512 / block 64 (its block-diffusion table); HumanEval
    # gen = block 512 with EOS logits at -inf and MBPP gen = block 256 with EOS/EoT confidence at -inf (its
    # pure-diffusion table)
    "llada_instruct_gsm8k": (INSTRUCT, ["gsm8k"], 5, 256, 8, 256, (False, False), "none", None),
    "llada_instruct_math": (INSTRUCT, ["minerva_math"], 4, 512, 64, 512, (False, False), "none", None),
    "llada_instruct_humaneval": (INSTRUCT, ["humaneval_instruct"], 0, 512, 512, 512, (True, False), "none", None),
    "llada_instruct_mbpp": (INSTRUCT, ["mbpp_instruct"], 3, 256, 256, 256, (False, True), "none", None),
}
# Fast-dLLM's grid: the baseline, + cache (prefix; dual), + parallel decoding (threshold 0.9), and both
FAST_DLLM_SWEEP = {"sampler.cache": "none,prefix,dual", "sampler.threshold": "null,0.9"}

# LLaDA-8B-Base likelihood presets (eval_llada_lm_eval.sh): lm-eval task, k-shot, cfg, mc_num, mini-batch
LIKELIHOOD = {
    "llada_base_gpqa": ("gpqa_main_n_shot", 5, 0.5, 128, 8),
    "llada_base_truthfulqa": ("truthfulqa_mc2", 0, 2.0, 128, 8),
    "llada_base_arc_c": ("arc_challenge", 0, 0.5, 128, 8),
    "llada_base_hellaswag": ("hellaswag", 0, 0.5, 128, 8),
    "llada_base_winogrande": ("winogrande", 5, 0.0, 128, 8),
    "llada_base_piqa": ("piqa", 0, 0.5, 128, 8),
    "llada_base_mmlu": ("mmlu", 5, 0.0, 1, 1),
}
CODE_TASKS = {"humaneval", "humaneval_instruct", "mbpp", "mbpp_instruct"}
SWEEPS = ("fast_dllm_ablation", "threshold_sweep")  # the older presets: sweeps, checked in test_eval.py


def composed(name: str, *overrides: str, hydra: bool = False):
    register()
    resolvers.register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("eval", overrides=[f"experiment={name}", *overrides], return_hydra_config=hydra)


def preset(name: str, *overrides: str) -> EvalConfig:
    return load(composed(name, *overrides), EvalConfig)


def test_every_preset_file_is_covered_by_a_published_setting():
    shipped = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    assert shipped == set(GENERATION) | set(LIKELIHOOD) | set(SWEEPS)


@pytest.mark.parametrize("name", sorted(GENERATION))
def test_generation_preset_holds_the_published_settings(name):
    path, tasks, shots, gen, block, steps, eos_inf, cache, threshold = GENERATION[name]
    cfg = preset(name)
    s, t = cfg.sampler, cfg.task
    assert (cfg.model.source, cfg.model.path, t.name, t.tasks, t.num_fewshot) == ("hf", path, "lm_eval", tasks, shots)
    assert (s.gen_length, s.block_length, s.steps) == (gen, block, steps)
    assert (s.logits_eos_inf, s.confidence_eos_eot_inf) == eos_inf
    assert (s.cache, s.threshold, s.factor, s.temperature, s.remasking) == (cache, threshold, None, 0.0,
                                                                           "low_confidence")
    assert s.cfg_scale == 0.0 and not s.early_stop  # the references decode every block, then cut at EOS
    # a task's own max_gen_toks (humaneval: 1024) would replace gen_length: every preset pins it to gen_length
    assert t.gen_kwargs == {"max_gen_toks": gen}
    assert t.apply_chat_template  # LLaDA-8B-Instruct is prompted through its chat template
    assert t.confirm_run_unsafe_code == bool(CODE_TASKS & set(tasks))


def test_fast_dllm_wraps_the_k_shot_prompt_in_one_user_turn_as_its_eval_script():
    assert not preset("fast_dllm_gsm8k").task.fewshot_as_multiturn
    assert preset("llada_instruct_gsm8k").task.fewshot_as_multiturn


@pytest.mark.parametrize("name", ["fast_dllm_gsm8k", "fast_dllm_humaneval"])
def test_fast_dllm_presets_sweep_the_baseline_cache_and_parallel_decoding(name):
    hc = composed(name, hydra=True).hydra
    assert str(hc.mode) == "RunMode.MULTIRUN"
    assert dict(hc.sweeper.params) == FAST_DLLM_SWEEP
    # every point of the grid passes the checks (a null threshold with dual cache included)
    for cache in ("none", "prefix", "dual"):
        for threshold in ("null", "0.9"):
            cfg = preset(name, f"sampler.cache={cache}", f"sampler.threshold={threshold}")
            assert (cfg.sampler.cache, cfg.sampler.threshold) == (cache, None if threshold == "null" else 0.9)


@pytest.mark.parametrize("name", sorted(set(GENERATION) - {"fast_dllm_gsm8k", "fast_dllm_humaneval"})
                         + sorted(LIKELIHOOD))
def test_single_setting_presets_run_once(name):
    hc = composed(name, hydra=True).hydra
    assert str(hc.mode) != "RunMode.MULTIRUN" and not hc.sweeper.params


@pytest.mark.parametrize("name", sorted(LIKELIHOOD))
def test_likelihood_preset_holds_the_published_settings(name):
    task, shots, cfg_scale, mc_num, mc_batch = LIKELIHOOD[name]
    cfg = preset(name)
    t = cfg.task
    assert (cfg.model.source, cfg.model.path, t.name) == ("hf", BASE, "lm_eval")
    assert (t.tasks, t.num_fewshot, t.cfg_scale, t.mc_num, t.mc_batch_size) == ([task], shots, cfg_scale, mc_num,
                                                                                 mc_batch)
    assert not t.apply_chat_template and not t.confirm_run_unsafe_code  # a base model, plain k-shot text


def test_the_command_line_still_overrides_a_preset():
    cfg = preset("llada_instruct_humaneval", "model=llada_1_5", "sampler.gen_length=1024", "task.limit=10")
    assert (cfg.model.path, cfg.sampler.gen_length, cfg.sampler.steps, cfg.task.limit) == ("GSAI-ML/LLaDA-1.5", 1024,
                                                                                           1024, 10)
    assert cfg.task.gen_kwargs == {"max_gen_toks": 1024}
    assert preset("llada_base_mmlu", "model=hf", "model.path=/data/llada-base").model.path == "/data/llada-base"
