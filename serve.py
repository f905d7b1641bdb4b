"""Start the OpenAI-compatible server: python serve.py [model=...] [sampler=...] [server.port=8080] ...

launcher=slurm submits it as a SLURM job instead and prints how to connect (llada_xp/launch.py).

A thin Hydra entry point: compose conf/serve.yaml, turn it into a typed ServeConfig, call llada_xp.server.serve.
A model that fails to load ends the process with status 1 and the reason.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from llada_xp import resolvers
from llada_xp.config import ConfigError, ServeConfig, load, register

log = logging.getLogger("serve")


@hydra.main(config_path="conf", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from llada_xp.launch import api_key
    from llada_xp.loading import ModelLoadError
    from llada_xp.server import serve

    try:
        config = load(cfg, ServeConfig)  # a bad default would otherwise turn every request into a 400
    except ConfigError as e:
        log.error("cannot serve: %s", e)
        sys.exit(1)
    if config.launcher.name == "slurm":  # submit the server as a SLURM job and follow it (llada_xp/launch.py)
        from llada_xp.launch import serve_on_slurm

        sys.exit(serve_on_slurm(config))
    if config.launcher.name != "local":
        log.error("cannot serve: launcher.name must be local or slurm, not %r", config.launcher.name)
        sys.exit(1)
    try:
        config.server.api_key = api_key(config.server)
        if config.server.replicas > 1:  # N servers behind the gateway on server.host:server.port (llada_xp/launch.py)
            from llada_xp.launch import serve_replicas

            sys.exit(serve_replicas(config))
        serve(config)
    except (ModelLoadError, ValueError, OSError) as e:  # the reason, without a traceback
        log.error("cannot serve: %s", e)
        sys.exit(1)


if __name__ == "__main__":
    register()
    resolvers.register()
    main()
