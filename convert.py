"""Convert a DCP training checkpoint into a Hugging Face folder: python convert.py model.path=... model.base_model=...

A thin Hydra entry point: compose conf/convert.yaml, turn it into a typed ConvertConfig, call llada_xp.checkpoint.run
(with model.adapter=...: llada_xp.loading.write_merged, which writes the model, of any source, with the adapter merged).
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
    from llada_xp.loading import ModelLoadError, write_merged

    try:
        config = load(cfg, ConvertConfig)
    except ConfigError as e:
        log.error("cannot convert: %s", e)
        sys.exit(1)
    try:
        folder = write_merged(config) if config.model.adapter else run(config)
    except (CheckpointError, ModelLoadError) as e:  # the reason, without a traceback
        log.error("cannot convert: %s", e)
        sys.exit(1)
    print(folder)


if __name__ == "__main__":
    register()
    main()
