"""Typed configuration: the dataclass schemas that conf/*.yaml extend, registered in Hydra's ConfigStore.

The only place defaults live. Code below the entry points receives these dataclasses (OmegaConf.to_object), never
a DictConfig. Importing this module does not touch Hydra; `register()` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING


@dataclass
class ModelConfig:
    """Where the weights come from and how they are placed."""

    # demo (the bundled tiny model) | hf (local folder or Hub id) | dcp (torch.distributed.checkpoint folder)
    source: str = "demo"
    # hf: a local folder in the LLaDA Hub layout or a Hub id; dcp: the checkpoint (any layout, see checkpoint.py)
    path: Optional[str] = None
    # The name served on /v1/models and written into eval results; None = derived from the path
    name: Optional[str] = None
    # Extra model names the server accepts (e.g. "llada-8b-instruct" for clients of the old server)
    aliases: list[str] = field(default_factory=list)
    # Hub revision (branch, tag or commit) for Hub ids
    revision: Optional[str] = None
    # auto = bfloat16 on GPU, float32 on CPU; or float32 | bfloat16 | float16 | float64
    dtype: str = "auto"
    # auto = cuda if available else cpu; or any torch device string
    device: str = "auto"
    # dcp: the Hugging Face model (Hub id or folder) whose config.json (and tokenizer, unless the checkpoint has
    # one) the checkpoint's weights belong to
    base_model: Optional[str] = None
    # dcp: where converted checkpoints are cached; None = $LLADA_XP_CACHE or ~/.cache/llada_xp/converted
    cache_dir: Optional[str] = None


@dataclass
class SamplerConfig:
    """Decoding settings (reference/sampling.md). Per request, the server overrides these field by field."""

    # Answer canvas length (max new tokens); the answer is cut at the first EOS/EoT
    gen_length: int = 128
    # Columns decoded together, left to right; shared by all rows of a batch
    block_length: int = 32
    # Denoising steps over the whole canvas (quota mode); spread over blocks in proportion to their length
    steps: int = 128
    # 0 = argmax (no random draw); > 0 = Gumbel-max sampling in float64
    temperature: float = 0.0
    # Classifier-free guidance scale (0 = off); shared by all rows of a batch
    cfg_scale: float = 0.0
    # low_confidence | random: which masked positions are committed first
    remasking: str = "low_confidence"
    # none | prefix | dual: Fast-dLLM KV cache mode; shared by all rows of a batch
    cache: str = "dual"
    # Fast-dLLM parallel decoding: commit every masked position with confidence >= threshold (at least one)
    threshold: Optional[float] = 0.9
    # Fast-dLLM dynamic rule (wins over threshold when set): rank n passes when (n+1)(1-c_n) <= factor
    factor: Optional[float] = None
    # Seed of the row's own generator; None = fresh randomness
    seed: Optional[int] = None
    # Ban EOS everywhere (LLaDA option); shared by all rows of a batch
    logits_eos_inf: bool = False
    # Give EOS/EoT zero confidence so they are committed last (LLaDA option); shared by all rows of a batch
    confidence_eos_eot_inf: bool = False
    # Stop strings, checked on committed text; a match ends the answer before the string
    stop: list[str] = field(default_factory=list)
    # Stop token ids (besides EOS/EoT), checked on committed tokens
    stop_token_ids: list[int] = field(default_factory=list)
    # Finish a row once it committed EOS/EoT with everything before it committed (off = reference NFE)
    early_stop: bool = True


def register() -> None:
    """Register the schemas in Hydra's ConfigStore (called by the entry points before composing)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="sampler", name="schema", node=SamplerConfig)


__all__ = ["MISSING", "ModelConfig", "SamplerConfig", "register"]
