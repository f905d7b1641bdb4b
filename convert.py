"""Convert a DCP training checkpoint into a Hugging Face folder: python convert.py model.path=... model.base_model=...

A thin Hydra entry point: compose conf/convert.yaml, turn it into a typed ConvertConfig, call llada_xp.checkpoint.run.
Prints the converted folder; a checkpoint that cannot be converted ends the process with status 1 and the reason.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from llada_xp.config import ConfigError, ConvertConfig, load, register

log = logging.getLogger("convert")


@hydra.main(config_path="conf", config_name="convert", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from llada_xp.checkpoint import CheckpointError, run

    try:
        config = load(cfg, ConvertConfig)
    except ConfigError as e:
        log.error("cannot convert: %s", e)
        sys.exit(1)
    try:
        folder = run(config)
    except CheckpointError as e:  # the reason, without a traceback
        log.error("cannot convert: %s", e)
        sys.exit(1)
    print(folder)


if __name__ == "__main__":
    register()
    main()
