"""OmegaConf resolvers the YAML files use: SLURM's time and memory formats mapped onto hydra-submitit's fields.

Imports nothing of ours, so any entry point can register them before composing without an import circle
(config.py registers schemas only). Knows nothing about SLURM beyond the two formats.
"""

from __future__ import annotations

import math
import re
from typing import Optional


def minutes(t: str | int) -> int:
    """SLURM's time formats ([D-]HH:MM:SS, HH:MM:SS, MM:SS, MM) -> whole minutes (at least 1)."""
    s = str(t).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise ValueError(f"launcher.time: cannot read {t!r} (use [D-]HH:MM:SS, HH:MM:SS or minutes)")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        secs = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        secs = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        secs = a * 60 + b
    else:  # MM
        secs = a * 60
    return max(1, math.ceil(secs / 60))


def gigabytes(mem: Optional[str]) -> Optional[int]:
    """sbatch --mem values (64G, 512M, 1T, plain MB) -> whole GB rounded up, for hydra-submitit's mem_gb."""
    if mem is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", str(mem).strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"launcher.mem: cannot read {mem!r} (use e.g. 64G or 512M)")
    scale = {"K": 1 / 2**20, "M": 1 / 1024, "": 1 / 1024, "G": 1, "T": 1024}[m.group(2).upper()]
    return max(1, math.ceil(float(m.group(1)) * scale))


def register() -> None:
    """Register the resolvers (conf/launcher/slurm.yaml: llada.minutes, llada.gb, llada.nonzero)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("llada.minutes", minutes, replace=True)
    OmegaConf.register_new_resolver("llada.gb", gigabytes, replace=True)
    OmegaConf.register_new_resolver("llada.nonzero", lambda n: n or None, replace=True)
