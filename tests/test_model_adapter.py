"""model.adapter: a PEFT LoRA adapter merged at load time (serve, eval, convert), against PEFT's own unmerged forward."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")  # the lora extra (in dev)

from llada_xp.config import ConvertConfig, ModelConfig  # noqa: E402
from llada_xp.loading import ModelLoadError, load_model, write_merged  # noqa: E402
from tests import tiny  # noqa: E402
from tests.test_server import Process  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]  # ff_out: block and LM head


def make_adapter(base_kw: dict, folder: Path, seed: int = 0, targets=TARGETS) -> torch.nn.Module:
    """A LoRA adapter with random (non-zero) A and B made with PEFT's own API; returns the unmerged PEFT model."""
    m = tiny.model(seed=1, **base_kw)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    pm = peft.get_peft_model(m, cfg).eval()
    pm.save_pretrained(folder)
    return pm


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base_kw = dict(n_kv_heads=2, weight_tying=False)
    tiny.write_hub_folder(root / "base", tiny.model(seed=1, **base_kw))
    pm = make_adapter(base_kw, root / "adapter")
    return root, pm


def test_merged_logits_equal_peft_unmerged_forward(base_and_adapter):
    root, pm = base_and_adapter
    loaded = load_model(ModelConfig(source="hf", path=str(root / "base"), adapter=str(root / "adapter"),
                                    dtype="float64"))
    x = torch.randint(0, 50, (2, 15), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = pm(input_ids=x).logits
        base = tiny.model(seed=1, n_kv_heads=2)(x).logits
    got = loaded.model(x).logits
    assert not torch.allclose(want, base, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert loaded.info.adapter == str(root / "adapter")
    assert not any("lora" in n for n, _ in loaded.model.named_parameters())  # a plain model: merged, unloaded


def test_convert_writes_the_merged_model(base_and_adapter, tmp_path):
    root, pm = base_and_adapter
    out = write_merged(ConvertConfig(model=ModelConfig(source="hf", path=str(root / "base"),
                                                       adapter=str(root / "adapter")),
                                     output=str(tmp_path / "merged"), dtype="float64"))
    m = load_model(ModelConfig(source="hf", path=str(out), dtype="float64")).model
    x = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, pm(input_ids=x).logits, rtol=1e-10, atol=1e-10)
    with pytest.raises(ModelLoadError, match="already exists"):
        write_merged(ConvertConfig(model=ModelConfig(source="hf", path=str(root / "base"),
                                                     adapter=str(root / "adapter")), output=str(out)))


def test_an_adapter_of_another_model_is_an_error_naming_the_modules(base_and_adapter, tmp_path):
    root, _ = base_and_adapter
    make_adapter({}, tmp_path / "mha")  # k_proj/v_proj of 4 KV heads, the base has 2
    with pytest.raises(ModelLoadError, match=r"mis-shaped: model\.transformer\.blocks\.0\.k_proj \(lora_B: "
                                             r"out_features 32, the model's 16\)"):
        load_model(ModelConfig(source="hf", path=str(root / "base"), adapter=str(tmp_path / "mha")))
    # a sequential-block adapter (fused att_proj) on a llama-block base
    make_adapter(dict(block_type="sequential", activation_type="swiglu"), tmp_path / "seq",
                 targets=["att_proj", "ff_proj"])
    with pytest.raises(ModelLoadError, match=r"modules the model lacks: model\.transformer\.blocks\.0\.att_proj"):
        load_model(ModelConfig(source="hf", path=str(root / "base"), adapter=str(tmp_path / "seq")))
    with pytest.raises(ModelLoadError, match="cannot read the adapter"):
        load_model(ModelConfig(source="hf", path=str(root / "base"), adapter=str(tmp_path / "nothing-here")))


def _env() -> dict:
    import os

    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="disabled")


@pytest.mark.slow
def test_eval_py_runs_with_an_adapter_and_refuses_a_wrong_one(base_and_adapter, tmp_path):
    root, pm = base_and_adapter
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "cat"}) + "\n"
                                               for p in ("hello world", "the cat sat", "a mat")))
    args = ["model=hf", f"model.path={root / 'base'}", "task=jsonl", f"task.path={tmp_path / 'qa.jsonl'}",
            "sampler.gen_length=8", "sampler.steps=8", "sampler.block_length=8", "progress=false"]
    p = subprocess.run([sys.executable, "eval.py", *args, f"model.adapter={root / 'adapter'}",
                        f"output_dir={tmp_path / 'ok'}"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "ok" / "metrics.json").is_file()
    bad = tmp_path / "bad"
    make_adapter({}, bad)
    p = subprocess.run([sys.executable, "eval.py", *args, f"model.adapter={bad}", f"output_dir={tmp_path / 'no'}"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "does not fit the base model" in p.stderr + p.stdout


@pytest.mark.slow
def test_serve_py_serves_the_merged_model(base_and_adapter, tmp_path):
    root, _ = base_and_adapter
    srv = Process(["model=hf", f"model.path={root / 'base'}", f"model.adapter={root / 'adapter'}"], tmp_path)
    try:
        r = srv.wait_ready().http.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 8})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        srv.stop()
