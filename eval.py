"""Evaluate a model on a task through the sampler core; results in Hydra's output dir (and W&B with logger=wandb).

    python eval.py [model=demo] [sampler=fast] [task=demo] [logger=none] [key=value ...]
    python eval.py -m sampler.threshold=0.5,0.7,0.9        # a sweep; the report is written when it ends
    python eval.py experiment=threshold_sweep              # a named sweep (conf/experiment/)

Thin wrapper: composes the config, fills in Hydra's output dir and the sweep's W&B group, calls
llada_xp.evaluate.evaluate and returns its metric (for sweepers). A bad setting, model or task ends the process
with status 1 and the reason.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from llada_xp.config import EvalConfig, register
from llada_xp.evaluate import EvalError, evaluate
from llada_xp.loading import ModelLoadError
from llada_xp.tasks import TaskError

log = logging.getLogger("eval")


def sweep_group(sweep_dir: str) -> str:
    """The W&B group of a multirun: its sweep dir's last two parts (multirun/eval/DATE/TIME -> eval-DATE_TIME)."""
    return "eval-" + "_".join(Path(sweep_dir).resolve().parts[-2:])


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(dc: DictConfig) -> float:
    cfg: EvalConfig = OmegaConf.to_object(dc)
    hc = HydraConfig.get()
    if cfg.output_dir is None:
        cfg.output_dir = hc.runtime.output_dir
    if cfg.logger.group is None and hc.mode == RunMode.MULTIRUN:
        cfg.logger.group = sweep_group(hc.sweep.dir)
    try:
        return evaluate(cfg)
    except (EvalError, ModelLoadError, TaskError, ValueError) as e:  # the reason, without a traceback
        log.error("cannot evaluate: %s", e)
        sys.exit(1)


if __name__ == "__main__":
    register()
    main()
