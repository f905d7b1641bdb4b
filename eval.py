"""Evaluate a model on a task through the sampler core; results in Hydra's output dir (and W&B with logger=wandb).

    python eval.py [model=demo] [sampler=fast] [task=demo] [logger=none] [key=value ...]
    python eval.py -m sampler.threshold=0.5,0.7,0.9        # a sweep; the report is written when it ends
    python eval.py experiment=threshold_sweep              # a named sweep (conf/experiment/)

Thin wrapper: composes the config, fills in Hydra's output dir and the sweep's W&B group, names the W&B run after
the point's swept overrides (all its overrides outside a sweep), calls llada_xp.evaluate.evaluate and returns its
metric (for sweepers). A bad setting, model or task ends the process with status 1 and the reason. In a sweep, a
point that fails writes failed.json (the error, its log, the logger config) into its output dir and the sweep goes
on; the report lists it, and the sweep then exits with status 1.
"""

import dataclasses
import logging
import math
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from llada_xp import resolvers
from llada_xp.config import ConfigError, EvalConfig, load, register
from llada_xp.evaluate import EvalError, evaluate, write_json
from llada_xp.loading import ModelLoadError
from llada_xp.report import FAILED, typed_overrides
from llada_xp.tasks import TaskError

log = logging.getLogger("eval")


def sweep_group(sweep_dir: str) -> str:
    """The W&B group of a multirun: its sweep dir's last two parts (multirun/eval/DATE/TIME -> eval-DATE_TIME)."""
    return "eval-" + "_".join(Path(sweep_dir).resolve().parts[-2:])


def swept_keys(sweep_dir: str) -> set[str]:
    """The keys a multirun sweeps (command-line sweeps and hydra.sweeper.params), from the multirun.yaml Hydra's
    sweeper wrote into the sweep dir before launching the jobs; none when it is missing."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.exists():
        return set()
    hydra_cfg = OmegaConf.load(path).hydra
    args = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()] + list(hydra_cfg.overrides.task)
    return {o.key_or_group for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()}


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(dc: DictConfig) -> float:
    hc = HydraConfig.get()
    job = list(hc.overrides.task)
    try:
        cfg = load(dc, EvalConfig)
    except ConfigError as e:  # a typo'd key or a value out of range: checked before anything loads
        log.error("cannot evaluate: %s", e)
        if hc.mode != RunMode.MULTIRUN:
            sys.exit(1)
        write_json(Path(hc.runtime.output_dir) / FAILED, dict(  # this point fails; the report lists it
            error=str(e), type=type(e).__name__, log=str(Path(hc.runtime.output_dir) / f"{hc.job.name}.log"),
            overrides=job, traceback=None, logger={}))
        return math.nan
    if cfg.output_dir is None:
        cfg.output_dir = hc.runtime.output_dir
    if cfg.logger.group is None and hc.mode == RunMode.MULTIRUN:
        cfg.logger.group = sweep_group(hc.sweep.dir)
    swept = swept_keys(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else set()
    point = [o for o in job if o.split("=", 1)[0].lstrip("+~") in swept] or job
    known = (EvalError, ModelLoadError, TaskError, ValueError)
    try:
        metric = evaluate(cfg, overrides=typed_overrides(job), name=",".join(point) or None)
        (Path(cfg.output_dir) / FAILED).unlink(missing_ok=True)  # an earlier failure of this point, now resumed
        return metric
    except Exception as e:
        if hc.mode != RunMode.MULTIRUN:
            if not isinstance(e, known):
                raise
            log.error("cannot evaluate: %s", e)  # the reason, without a traceback
            sys.exit(1)
        # one point of a sweep: record why, let the others run (the report lists it; the sweep exits 1)
        job_log = Path(hc.runtime.output_dir) / f"{hc.job.name}.log"
        log.error("this point failed (%s): %s", type(e).__name__, e, exc_info=not isinstance(e, known))
        failed = dict(error=str(e), type=type(e).__name__, log=str(job_log), overrides=job,
                      traceback=None if isinstance(e, known) else traceback.format_exc(),
                      logger=dataclasses.asdict(cfg.logger))  # where the report logs the failure
        write_json(Path(cfg.output_dir) / FAILED, failed)
        return math.nan


if __name__ == "__main__":
    register()
    resolvers.register()
    main()
