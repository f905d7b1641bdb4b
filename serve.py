"""Start the OpenAI-compatible server: python serve.py [model=...] [sampler=...] [server.port=8080] ...

A thin Hydra entry point: compose conf/serve.yaml, turn it into a typed ServeConfig, call llada_xp.server.serve.
A model that fails to load ends the process with status 1 and the reason.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from llada_xp.config import ServeConfig, register

log = logging.getLogger("serve")


@hydra.main(config_path="conf", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from llada_xp.loading import ModelLoadError
    from llada_xp.server import serve

    config: ServeConfig = OmegaConf.to_object(cfg)
    try:
        serve(config)
    except (ModelLoadError, ValueError, OSError) as e:  # the reason, without a traceback
        log.error("cannot serve: %s", e)
        sys.exit(1)


if __name__ == "__main__":
    register()
    main()
