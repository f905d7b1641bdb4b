"""Composed configs are checked before anything runs: unknown keys (Hydra's `+key=` adds them silently), values out
of range, and the schemas are not choices of any group."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from llada_xp import resolvers
from llada_xp.config import ConfigError, ConvertConfig, EvalConfig, ServeConfig, load, register

ROOT = Path(__file__).resolve().parents[1]
PRIMARIES = {"serve": ServeConfig, "eval": EvalConfig, "convert": ConvertConfig}
GROUPS = {g: sorted(p.stem for p in (ROOT / "conf" / g).glob("*.yaml"))
          for g in ("model", "sampler", "task", "logger", "launcher")}


def composed(primary: str, overrides: list[str]):
    register()
    resolvers.register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(primary, overrides=overrides)


def checked(primary: str, *overrides: str):
    return load(composed(primary, list(overrides)), PRIMARIES[primary])


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts if g != "task"]
                         + [("task", o) for o in GROUPS["task"]])
def test_every_shipped_config_passes_the_checks(group, option):
    primary = "eval" if group in ("task", "logger") else "serve"
    extra = {"dcp": ["model.path=x", "model.base_model=y"], "hf": ["model.path=x"], "jsonl": ["task.path=x"],
             "lm_eval": ["task.tasks=[x]"]}
    cfg = checked(primary, f"{group}={option}", *extra.get(option, []))
    assert getattr(cfg, group) is not None


@pytest.mark.parametrize("primary,override,message", [
    ("eval", "+sampler.threshhold=0.5", "unknown key sampler.threshhold; did you mean sampler.threshold?"),
    ("serve", "+server.prot=8001", "unknown key server.prot; did you mean server.port?"),
    ("eval", "+task.limt=3", "unknown key task.limt; did you mean task.limit?"),
    ("eval", "+batchsize=3", "unknown key batchsize; did you mean batch_size?"),
    ("convert", "+model.pth=x", "unknown key model.pth; did you mean model.path?"),
])
def test_a_typo_added_with_plus_is_an_error_naming_the_key(primary, override, message):
    with pytest.raises(ConfigError) as e:
        checked(primary, override)
    assert str(e.value) == message


@pytest.mark.parametrize("overrides,message", [
    (["model=hf"], "model.path is required for source=hf"), (["model=dcp"], "model.path is required for source=dcp"),
    (["model=dcp", "model.path=x"], "model.base_model is required for source=dcp")])
def test_a_required_value_left_out_is_an_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        checked("serve", *overrides)


def test_free_form_dicts_still_take_new_keys():
    cfg = checked("serve", "launcher=slurm", "+launcher.additional_parameters.reservation=r1")
    assert cfg.launcher.additional_parameters == {"reservation": "r1"}


@pytest.mark.parametrize("primary,override,key", [
    ("eval", "sampler.threshold=2", "sampler.threshold"), ("serve", "sampler.cache=bogus", "sampler.cache"),
    ("eval", "sampler.steps=0", "sampler.steps"), ("serve", "sampler.remasking=top", "sampler.remasking"),
    ("serve", "sampler.factor=0", "sampler.factor"), ("eval", "sampler.temperature=-1", "sampler.temperature"),
    ("serve", "model.threads=0", "model.threads"), ("serve", "model.source=s3", "model.source"),
    ("serve", "model.dtype=int8", "model.dtype"), ("serve", "server.port=70000", "server.port"),
    ("serve", "server.max_batch_size=0", "server.max_batch_size"), ("serve", "server.log_level=loud", "server.log_level"),
    ("serve", "launcher.name=k8s", "launcher.name"), ("eval", "logger.name=mlflow", "logger.name"),
    ("eval", "batch_size=0", "batch_size"), ("eval", "shard_index=2", "shard_index"),
    ("serve", "server.scheduler=fifo", "server.scheduler"), ("eval", "feed=lazy", "feed"),
])
def test_out_of_range_values_are_errors_naming_the_key(primary, override, key):
    with pytest.raises(ConfigError, match=rf"^{key} must "):
        checked(primary, override)


def test_schemas_are_not_choices_of_any_group():
    with pytest.raises(MissingConfigException):
        composed("serve", ["model=schema"])
    out = subprocess.run([sys.executable, "eval.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    groups = out.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "schema" not in groups and "model: dcp, demo, hf" in groups


@pytest.mark.slow
@pytest.mark.parametrize("script,override,message", [
    ("eval.py", "+sampler.threshhold=0.5", "cannot evaluate: unknown key sampler.threshhold"),
    ("serve.py", "sampler.threshold=2", "cannot serve: sampler.threshold must be in [0, 1]"),
])
def test_entry_points_refuse_to_start_on_a_bad_config(tmp_path, script, override, message):
    out = subprocess.run([sys.executable, str(ROOT / script), override, f"hydra.run.dir={tmp_path}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert message in out.stdout + out.stderr
    assert "Uvicorn running" not in out.stderr and "accuracy" not in out.stderr  # nothing ran


@pytest.mark.slow
def test_a_sweep_point_with_a_bad_value_fails_alone(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run([sys.executable, str(ROOT / "eval.py"), "-m", "sampler.threshold=0.9,2", "task.limit=2",
                          "progress=false", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert (sweep / "0" / "metrics.json").exists()
    failed = json.loads((sweep / "1" / "failed.json").read_text())
    assert failed["type"] == "ConfigError" and failed["error"].startswith("sampler.threshold must be in [0, 1]")
    assert "sampler.threshold" in (sweep / "report.md").read_text()
