"""DCP checkpoints → Hugging Face folders (checkpoint.py, convert.py): every layout converts exactly, the cache is
reused, concurrent and interrupted conversions are safe, and bad input gets errors naming the cause.

Checkpoints are real torch.distributed.checkpoint saves of tiny random models (and of the demo model when it exists).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors import safe_open

from llada_xp import checkpoint
from llada_xp.checkpoint import CheckpointError
from llada_xp.config import ConvertConfig, ModelConfig, SamplerConfig, register
from llada_xp.loading import DEMO_DIR, load_model, special_ids
from llada_xp.model import LLaDAModelLM
from llada_xp.sampler import Request, Sampler
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
CUSTOM_TEMPLATE = "{{ bos_token }}TRAINED" + tiny.CHAT_TEMPLATE
SETTINGS = [SamplerConfig(gen_length=16, block_length=8, steps=16, cache="none", threshold=None),
            SamplerConfig(gen_length=16, block_length=8, steps=16, cache="dual", threshold=0.5, temperature=0.7,
                          seed=3)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny bf16 models: a second thread makes forwards ~20x slower on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLADA_XP_CACHE", str(tmp_path / "default_cache"))  # never the user's cache


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base model folder (float32, seed 0) and a 'fine-tuned' model (bfloat16, other weights) saved as HF."""
    d = tmp_path_factory.mktemp("models")
    base = tiny.write_hub_folder(d / "base", tiny.model(seed=0, dtype=torch.float32))
    trained = tiny.model(seed=1, dtype=torch.bfloat16, sharpen=4.0)
    return base, tiny.write_hub_folder(d / "trained", trained), trained


# layout → (state dict wrapped in {"model": ...}, DCP folder under step_7/policy, tokenizer/ saved, path given)
LAYOUTS = {
    "v1_weights_folder": (True, "weights", False, "step_7/policy/weights"),
    "v1_step_folder": (True, "weights", False, "step_7"),
    "v2_policy_root_with_tokenizer": (False, "weights/model", True, "step_7/policy"),
    "v2_dcp_folder": (False, "weights/model", False, "step_7/policy/weights/model"),
    "bare_dcp_folder": (False, None, False, "ckpt"),
}


def write_run(root: Path, hf: Path, layout: str) -> Path:
    """A training run in `layout` under root (optimizer/, config.yaml and training_info.json beside); the path a
    user would give."""
    wrap, sub, tok, given = LAYOUTS[layout]
    if sub is None:
        checkpoint.to_dcp(hf, root / given, wrap=wrap)
        return root / given
    policy = root / "step_7" / "policy"
    checkpoint.to_dcp(hf, policy / sub, wrap=wrap)
    (policy / "optimizer").mkdir()
    (root / "config.yaml").write_text("policy: {model_name: tiny}\n")
    (root / "step_7" / "training_info.json").write_text('{"step": 7}\n')
    if tok:
        t = tiny.tokenizer()
        t.chat_template = CUSTOM_TEMPLATE
        t.save_pretrained(policy / "tokenizer")
    return root / given


def generate(model, tokenizer, ids) -> list[list[int]]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "the cat sat on"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    sampler = Sampler(model, ids)
    return [sampler.generate([Request(list(prompt), s)])[0].tokens for s in SETTINGS]


def assert_same_model(folder: Path, source: LLaDAModelLM, dtype: str = "bfloat16"):
    """The converted folder loads, gives the source's logits bit for bit and generates exactly its tokens."""
    loaded = load_model(ModelConfig(source="hf", path=str(folder), dtype=dtype, device="cpu"))
    ids = torch.arange(40).reshape(2, 20) % source.config.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, source(ids).logits)
    tok = tiny.tokenizer()
    assert generate(loaded.model, tok, loaded.info.ids) == generate(source, tok, special_ids(source.config, tok))
    return loaded


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_converts_to_the_same_model(models, layout, tmp_path):
    base, hf, trained = models
    path = write_run(tmp_path / "run", hf, layout)
    out = checkpoint.convert(str(path), str(base), str(tmp_path / "out"), max_shard_size="20KB",
                             cache_dir=str(tmp_path / "cache"))
    loaded = assert_same_model(out, trained)
    with safe_open(out / "model-00001-of-00003.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # kept, although the base is fp32
    assert json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"] > 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with_tokenizer = LAYOUTS[layout][2]
    assert loaded.tokenizer.chat_template == (CUSTOM_TEMPLATE if with_tokenizer else tiny.CHAT_TEMPLATE)
    prov = json.loads((out / checkpoint.PROVENANCE).read_text())
    assert prov["base_model"] == str(base) and prov["wrapped"] == LAYOUTS[layout][0]
    assert prov["tokenizer"] == (str(path.resolve() / "tokenizer") if with_tokenizer else str(base))
    tok_src = path.resolve() / "tokenizer" if with_tokenizer else base
    assert (out / "tokenizer_config.json").read_bytes() == (tok_src / "tokenizer_config.json").read_bytes()
    assert (out / checkpoint.COMPLETE).is_file() and not list(tmp_path.glob(".out.tmp-*"))


def test_the_conversion_record_holds_absolute_paths_when_given_relative_ones(models, tmp_path, monkeypatch):
    base, hf, _ = models
    write_run(tmp_path / "run", hf, "v2_policy_root_with_tokenizer")
    (tmp_path / "base").symlink_to(base)
    monkeypatch.chdir(tmp_path)
    out = checkpoint.convert("run/step_7/policy", "base", "out", cache_dir="cache")
    prov = json.loads((tmp_path / out / checkpoint.PROVENANCE).read_text())
    policy = (tmp_path / "run" / "step_7" / "policy").resolve()
    assert prov["source"] == str(policy / "weights" / "model") and prov["tokenizer"] == str(policy / "tokenizer")
    assert prov["base_model"] == str(base.resolve())


def test_dtype_is_converted_only_when_asked(models, tmp_path):
    base, hf, trained = models
    path = write_run(tmp_path / "run", hf, "v2_dcp_folder")
    out = checkpoint.convert(str(path), str(base), str(tmp_path / "out"), dtype="float32",
                             cache_dir=str(tmp_path / "cache"))
    with safe_open(out / "model.safetensors", "pt") as f:
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), trained.state_dict()[k].float())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert_same_model(out, copy.deepcopy(trained).float(), dtype="float32")


def test_model_source_dcp_loads_through_the_cache_and_reuses_it(models, tmp_path, caplog):
    base, hf, trained = models
    path = write_run(tmp_path / "run", hf, "v2_policy_root_with_tokenizer")
    cfg = ModelConfig(source="dcp", path=str(path), base_model=str(base), cache_dir=str(tmp_path / "cache"),
                      dtype="bfloat16", device="cpu")
    caplog.set_level(logging.INFO, logger="llada_xp.checkpoint")
    loaded = load_model(cfg)
    assert loaded.tokenizer.chat_template == CUSTOM_TEMPLATE
    assert_same_model(Path(loaded.info.path), trained)
    caplog.clear()
    assert checkpoint.converted_folder(cfg) == Path(loaded.info.path)
    assert "reusing" in caplog.text and "converting" not in caplog.text
    # The same base folder spelt another way (relative to the working dir) is the same cache entry.
    relative = os.path.relpath(base, Path.cwd())
    assert checkpoint.converted_folder(dataclasses.replace(cfg, base_model=relative)) == Path(loaded.info.path)
    # A changed checkpoint (a shard rewritten) is a new cache entry, never the stale one.
    shard = path / "weights" / "model" / "__0_0.distcp"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert checkpoint.converted_folder(cfg) != Path(loaded.info.path)


def test_an_existing_output_folder_is_reused_only_when_it_holds_this_conversion(models, tmp_path):
    base, hf, _ = models
    path = write_run(tmp_path / "run", hf, "bare_dcp_folder")
    out = tmp_path / "out"
    kw = dict(cache_dir=str(tmp_path / "cache"))
    first = (checkpoint.convert(str(path), str(base), str(out), **kw) / "model.safetensors").stat().st_mtime_ns
    assert (checkpoint.convert(str(path), str(base), str(out), **kw) / "model.safetensors").stat().st_mtime_ns == first
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.convert(str(path), str(base), str(other), **kw)


def test_to_dcp_cli_round_trips_a_hub_folder(models, tmp_path):
    base, hf, trained = models
    assert checkpoint.main(["to-dcp", str(hf), str(tmp_path / "weights"), "--wrap"]) == 0
    out = checkpoint.convert(str(tmp_path / "weights"), str(base), str(tmp_path / "out"),
                             cache_dir=str(tmp_path / "cache"))
    assert_same_model(out, trained)
    assert checkpoint.main(["to-dcp", str(hf), str(tmp_path / "weights")]) == 1  # never over a checkpoint


def _save_sharded(rank: int, world: int, sd: dict, path: str, store: str):
    """One rank of an FSDP-like job: every tensor a DTensor sharded on dim 0 over 2 CPU ranks."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    dcp.save({"model": {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in sd.items()}}, checkpoint_id=path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_checkpoint_sharded_over_two_ranks_converts_exactly(models, tmp_path):
    base, _, trained = models
    path = tmp_path / "step_3" / "policy" / "weights"
    sd = {k: v.clone() for k, v in trained.state_dict().items()}
    ranks = torch.multiprocessing.start_processes(_save_sharded, args=(2, sd, str(path), str(tmp_path / "store")),
                                                  nprocs=2, start_method="fork", join=False)
    deadline = time.monotonic() + 60
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail("the two ranks did not finish saving within 60 s")
    assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    out = checkpoint.convert(str(tmp_path / "step_3"), str(base), str(tmp_path / "out"),
                             cache_dir=str(tmp_path / "cache"))
    assert_same_model(out, trained)


def test_demo_model_round_trips_through_dcp(tmp_path):
    demo = load_model(ModelConfig(source="demo", dtype="float32", device="cpu"))
    path = write_run(tmp_path / "run", DEMO_DIR, "v1_step_folder")
    out = checkpoint.convert(str(path), str(DEMO_DIR), str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    loaded = load_model(ModelConfig(source="hf", path=str(out), dtype="float32", device="cpu"))
    ids = torch.arange(30).reshape(1, 30) % demo.model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, demo.model(ids).logits)
    assert generate(loaded.model, demo.tokenizer, loaded.info.ids) == generate(demo.model, demo.tokenizer,
                                                                               demo.info.ids)


def test_convert_yaml_composes_to_a_typed_config_that_runs(models, tmp_path):
    base, hf, trained = models
    path = write_run(tmp_path / "run", hf, "v1_step_folder")
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("convert", overrides=[f"model.path={path}", f"model.base_model={base}"]))
    assert isinstance(cfg, ConvertConfig) and cfg.model.source == "dcp" and cfg.output is None
    assert (cfg.dtype, cfg.max_shard_size) == (ConvertConfig.dtype, ConvertConfig.max_shard_size)
    folder = checkpoint.run(cfg)
    assert folder.parent == Path(os.environ["LLADA_XP_CACHE"])
    assert_same_model(folder, trained)


# --- errors ---

def test_missing_and_unrecognised_paths_say_what_was_found(tmp_path, models):
    base = str(models[0])
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        checkpoint.convert(str(tmp_path / "nope"), base, str(tmp_path / "out"))
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    (tmp_path / "stuff" / "logs").mkdir()
    with pytest.raises(CheckpointError, match=r"no DCP checkpoint .* contains logs/, notes.txt"):
        checkpoint.find_checkpoint(tmp_path / "stuff")
    for n in (100, 200):
        (tmp_path / "run" / f"step_{n}").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="point model.path at one of them: step_100, step_200"):
        checkpoint.find_checkpoint(tmp_path / "run")


def test_truncated_and_corrupt_checkpoints_are_named(models, tmp_path):
    base, hf, _ = models

    def attempt(name: str, damage) -> str:
        path = write_run(tmp_path / name, hf, "v1_weights_folder")
        damage(path)
        with pytest.raises(CheckpointError) as e:
            checkpoint.convert(str(path), str(base), str(tmp_path / f"out_{name}"), cache_dir=str(tmp_path / "c"))
        assert not (tmp_path / f"out_{name}").exists() and not list(tmp_path.glob(f".out_{name}.tmp-*"))
        return str(e.value)

    shard = "__0_0.distcp"
    cut = attempt("cut", lambda p: os.truncate(p / shard, (p / shard).stat().st_size // 2))
    assert "truncated checkpoint" in cut and shard in cut
    assert "no .metadata" in attempt("nometa", lambda p: (p / ".metadata").unlink())
    assert "shard file __0_0.distcp" in attempt("noshard", lambda p: (p / shard).unlink())
    assert ".metadata" in attempt("badmeta", lambda p: (p / ".metadata").write_bytes(b"\x80\x04garbage"))
    assert "corrupt" in attempt("badshard", lambda p: (p / shard).write_bytes(os.urandom((p / shard).stat().st_size)))


def flip_a_bit_of(folder: Path, tensor: torch.Tensor) -> str:
    """Flip one bit in the middle of tensor's bytes where they lie in a shard of folder; the shard's name."""
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    for shard in sorted(folder.glob("*.distcp")):
        data = bytearray(shard.read_bytes())
        at = data.find(raw)
        if at >= 0:
            assert data.find(raw, at + 1) < 0
            data[at + len(raw) // 2] ^= 0x10
            shard.write_bytes(data)
            return shard.name
    raise AssertionError("the tensor's bytes are in no shard")


def test_a_bit_flipped_shard_is_named_with_the_tensor_and_nothing_is_written(models, tmp_path):
    base, hf, trained = models
    path = write_run(tmp_path / "run", hf, "v1_weights_folder")
    name = "model.transformer.blocks.1.attn_out.weight"
    shard = flip_a_bit_of(path, trained.state_dict()[name])
    with pytest.raises(CheckpointError) as e:
        checkpoint.convert(str(path), str(base), str(tmp_path / "out"), cache_dir=str(tmp_path / "c"))
    assert f"shard file {shard}" in str(e.value) and f"tensor {name}" in str(e.value) and "CRC" in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_checkpoint_saved_without_crcs_converts_with_a_warning(models, tmp_path, caplog):
    base, hf, trained = models
    torch.serialization.set_crc32_options(False)
    try:
        path = write_run(tmp_path / "run", hf, "v2_dcp_folder")
    finally:
        torch.serialization.set_crc32_options(True)
    caplog.set_level(logging.WARNING, logger="llada_xp.checkpoint")
    out = checkpoint.convert(str(path), str(base), str(tmp_path / "out"), cache_dir=str(tmp_path / "c"))
    assert f"{len(trained.state_dict())} tensor(s) carry no CRC32" in caplog.text
    assert_same_model(out, trained)


def test_a_wrong_base_model_names_the_mismatched_tensors(models, tmp_path):
    _, hf, _ = models
    path = write_run(tmp_path / "run", hf, "v2_dcp_folder")
    wide = tiny.write_hub_folder(tmp_path / "wide", tiny.model(d_model=64, n_heads=4))
    with pytest.raises(CheckpointError, match=r"mis-shaped.*model.transformer.wte.weight \[\d+, 32\] vs \[\d+, 64\]"):
        checkpoint.convert(str(path), str(wide), str(tmp_path / "o1"), cache_dir=str(tmp_path / "c"))
    deep = tiny.write_hub_folder(tmp_path / "deep", tiny.model(n_layers=3))
    with pytest.raises(CheckpointError, match=r"missing: model.transformer.blocks.2.attn_norm.weight"):
        checkpoint.convert(str(path), str(deep), str(tmp_path / "o2"), cache_dir=str(tmp_path / "c"))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="'llama' model .* not LLaDA"):
        checkpoint.convert(str(path), str(llama), str(tmp_path / "o3"))
    with pytest.raises(CheckpointError, match="base model folder not found"):
        checkpoint.convert(str(path), str(tmp_path / "absent"), str(tmp_path / "o4"))
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache and the Hub is offline"):
        checkpoint.convert(str(path), "nobody-xyz/no-such-llada", str(tmp_path / "o5"))


def test_not_enough_disk_is_refused_before_writing(models, tmp_path, monkeypatch):
    base, hf, _ = models
    path = write_run(tmp_path / "run", hf, "v2_dcp_folder")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10**9, 0, 1000))
    with pytest.raises(CheckpointError, match=r"not enough disk space in .*needs .* MB, 1.0 KB free"):
        checkpoint.convert(str(path), str(base), str(tmp_path / "out"), cache_dir=str(tmp_path / "c"))
    assert not (tmp_path / "out").exists()


# --- convert.py as a process: cache reuse, concurrency, interruption, CLI errors ---

def convert_cli(*overrides: str, delay: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **({checkpoint.DELAY_ENV: str(delay)} if delay else {}))
    return subprocess.Popen([sys.executable, "convert.py", *overrides], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


@pytest.mark.slow
def test_convert_cli_converts_once_then_reuses_the_cache(models, tmp_path):
    base, hf, trained = models
    path = write_run(tmp_path / "run", hf, "v1_step_folder")
    args = (f"model.path={path}", f"model.base_model={base}", f"model.cache_dir={tmp_path / 'cache'}")
    rc, out, err = finish(convert_cli(*args))
    assert rc == 0, err
    folder = Path(out.strip().splitlines()[-1])
    assert folder.parent == tmp_path / "cache" and "converting" in err
    stamp = (folder / checkpoint.PROVENANCE).stat().st_mtime_ns
    rc, out2, err2 = finish(convert_cli(*args))
    assert rc == 0 and out2 == out, err2
    assert "reusing" in err2 and "converting" not in err2
    assert (folder / checkpoint.PROVENANCE).stat().st_mtime_ns == stamp
    assert_same_model(folder, trained)


@pytest.mark.slow
def test_two_processes_started_together_convert_once(models, tmp_path):
    base, hf, trained = models
    path = write_run(tmp_path / "run", hf, "v2_policy_root_with_tokenizer")
    args = (f"model.path={path}", f"model.base_model={base}", f"model.cache_dir={tmp_path / 'cache'}")
    procs = [convert_cli(*args, delay=0.1) for _ in range(2)]
    (rc1, out1, err1), (rc2, out2, err2) = [finish(p) for p in procs]
    assert rc1 == rc2 == 0, err1 + err2
    assert out1 == out2
    assert (err1 + err2).count("converting /") == 1 and "reusing" in err1 + err2
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == \
        [Path(out1.strip()).name]
    assert_same_model(Path(out1.strip()), trained)


@pytest.mark.slow
def test_a_killed_conversion_is_never_trusted_and_the_next_run_converts_cleanly(models, tmp_path, caplog):
    base, hf, trained = models
    path = write_run(tmp_path / "run", hf, "v1_step_folder")
    cache = tmp_path / "cache"
    p = convert_cli(f"model.path={path}", f"model.base_model={base}", f"model.cache_dir={cache}", delay=0.5)
    deadline = time.monotonic() + 60
    while not list(cache.glob(".*.tmp-*/model.safetensors")):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert [e.name for e in cache.iterdir() if not e.name.startswith(".")] == []  # nothing a run would use
    caplog.set_level(logging.INFO, logger="llada_xp.checkpoint")
    folder = checkpoint.converted_folder(ModelConfig(source="dcp", path=str(path), base_model=str(base),
                                                     cache_dir=str(cache)))
    assert "removing the interrupted conversion" in caplog.text and "converting" in caplog.text
    assert not list(cache.glob(".*.tmp-*"))
    assert_same_model(folder, trained)


@pytest.mark.slow
def test_convert_cli_user_errors_exit_1_without_a_traceback(tmp_path):
    rc, out, err = finish(convert_cli(f"model.path={tmp_path / 'nope'}", f"model.base_model={tmp_path}"))
    assert rc == 1 and out == ""
    assert "cannot convert: checkpoint not found" in err and "Traceback" not in err


@pytest.mark.slow
def test_convert_cli_names_a_bit_flipped_shard_exits_1_and_caches_nothing(models, tmp_path):
    base, hf, trained = models
    path = write_run(tmp_path / "run", hf, "v1_step_folder")
    name = "model.transformer.wte.weight"
    shard = flip_a_bit_of(path / "policy" / "weights", trained.state_dict()[name])
    rc, out, err = finish(convert_cli(f"model.path={path}", f"model.base_model={base}",
                                      f"model.cache_dir={tmp_path / 'cache'}"))
    assert rc == 1 and out == "" and "Traceback" not in err
    assert f"shard file {shard}" in err and f"tensor {name}" in err
    assert [e.name for e in (tmp_path / "cache").iterdir() if not e.name.startswith(".")] == []
    assert not list((tmp_path / "cache").glob(".*.tmp-*"))


@pytest.mark.slow
def test_convert_cli_with_a_hub_base_model_keeps_its_tokenizer_config_and_id(models, tmp_path):
    base, hf, trained = models
    snapshot = tmp_path / "hub" / "models--org--tiny-llada" / "snapshots" / ("0" * 40)
    shutil.copytree(base, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    path = write_run(tmp_path / "run", hf, "v1_step_folder")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    r = subprocess.run([sys.executable, "convert.py", f"model.path={path}", "model.base_model=org/tiny-llada",
                        f"output={tmp_path / 'out'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert (out / "tokenizer_config.json").read_bytes() == (base / "tokenizer_config.json").read_bytes()
    prov = json.loads((out / checkpoint.PROVENANCE).read_text())
    assert prov["base_model"] == prov["tokenizer"] == "org/tiny-llada"
    assert_same_model(out, trained)


def on_a_terminal(*args: str) -> tuple[int, str, str]:
    """Run python args with stderr on a pseudo-terminal (so tqdm draws its bar); exit status, stdout, stderr."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns (a new pty has 0)
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                         stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    out = p.stdout.read().decode()
    return p.wait(timeout=120), out, err.decode()


def bar_lines(err: str, desc: str) -> list[str]:
    """Every state of the bar called desc, and any other text drawn on its line."""
    return [s for s in re.split(r"[\r\n]", err) if s.startswith(desc) or "%|" in s]


@pytest.mark.slow
def test_convert_cli_progress_bar_reaches_the_total_and_log_lines_do_not_break_it(models, tmp_path):
    base, hf, _ = models
    path = write_run(tmp_path / "run", hf, "v1_step_folder")
    rc, out, err = on_a_terminal("convert.py", f"model.path={path}", f"model.base_model={base}",
                                 f"output={tmp_path / 'out'}", "max_shard_size=20KB")
    assert rc == 0, err
    assert "wrote model-00003-of-00003.safetensors (3/3)" in err
    lines = bar_lines(err, "converting:")
    assert lines and lines[-1].startswith("converting: 100%|"), lines
    assert all(re.fullmatch(r"converting: +\d+%\|[^|]*\|[^\[]*\[[^\]]*\] *", s) for s in lines), lines


@pytest.mark.slow
def test_to_dcp_cli_shows_a_progress_bar_that_reaches_the_total(models, tmp_path):
    _, hf, _ = models
    rc, out, err = on_a_terminal("-m", "llada_xp.checkpoint", "to-dcp", str(hf), str(tmp_path / "weights"))
    assert rc == 0, err
    lines = bar_lines(err, "saving:")
    assert lines and lines[-1].startswith("saving: 100%|"), lines
    assert (tmp_path / "weights" / ".metadata").is_file()


@pytest.mark.slow
def test_conversion_memory_is_about_one_tensor_not_the_checkpoint(tmp_path):
    """Peak RSS growth of converting a ~100 MB checkpoint, in a fresh process after a warm-up conversion."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    small = tiny.write_hub_folder(tmp_path / "small", tiny.model(dtype=torch.float32))
    big_model = tiny.model(dtype=torch.float32, d_model=512, n_heads=8, n_layers=7, mlp_hidden_size=1536)
    big = tiny.write_hub_folder(tmp_path / "big", big_model, shard_size="2GB")
    checkpoint.to_dcp(small, tmp_path / "small_dcp")
    checkpoint.to_dcp(big, tmp_path / "big_dcp")
    size = sum(f.stat().st_size for f in (tmp_path / "big_dcp").glob("*.distcp"))
    del big_model
    script = (  # Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current RSS
        "import sys, json\n"
        "from llada_xp import checkpoint as c\n"
        "t = sys.argv[1]\n"
        "kb = lambda k: int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(k + ':'))) * 1024\n"
        "c.convert(t + '/small_dcp', t + '/small', t + '/o1', cache_dir=t + '/c')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "r0 = kb('VmRSS'); c.convert(t + '/big_dcp', t + '/big', t + '/o2', cache_dir=t + '/c')\n"
        "print(json.dumps([r0, kb('VmHWM')]))\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr
    r0, r1 = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"converting a {size / 1e6:.0f} MB checkpoint grew peak RSS by {(r1 - r0) / 1e6:.1f} MB")
    assert r1 - r0 < size / 4


@pytest.mark.slow
def test_serve_py_serves_a_dcp_checkpoint_and_a_second_start_reuses_the_cache(tmp_path):
    from tests.test_server import Process

    path = write_run(tmp_path / "run", DEMO_DIR, "v2_dcp_folder")
    cache = tmp_path / "cache"
    overrides = ["model=dcp", f"model.path={path}", f"model.base_model={DEMO_DIR}", f"model.cache_dir={cache}",
                 "server.log_level=info"]
    answers, marks = [], []
    for run in ("first", "second"):
        (tmp_path / run).mkdir()
        srv = Process(overrides, tmp_path / run).wait_ready()
        try:
            r = srv.client().chat.completions.create(model=srv.http.get("/v1/models").json()["data"][0]["id"],
                                                     messages=[{"role": "user", "content": "Copy: the cat"}],
                                                     max_tokens=16, temperature=0)
            answers.append(r.choices[0].message.content)
            marks.append([p.stat().st_mtime_ns for p in cache.rglob(checkpoint.COMPLETE)])
        finally:
            srv.stop()
    log1, log2 = ((tmp_path / run / "serve.log").read_text() for run in ("first", "second"))
    assert len(marks[0]) == 1 and marks[0] == marks[1]  # one cache entry, not rewritten by the second start
    assert "converting" in log1 and "converting" not in log2 and "reusing the conversion" in log2
    assert answers[0] == answers[1]
