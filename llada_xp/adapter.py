"""PEFT adapters (LoRA) merged into a loaded LLaDA model: checked against the model, then folded into its weights.

The adapter's weights are checked module by module before PEFT touches the model (a module the model lacks, a shape
that differs, a targeted module the file has no weights for: an error naming them), then PEFT merges them
(`merge_and_unload`), so the sampler and KV cache see a plain model. Needs the `lora` extra (peft). Knows nothing about
sources, sampling or HTTP.
"""

from __future__ import annotations

import logging
import re

from torch import nn

log = logging.getLogger(__name__)

PREFIX = "base_model.model."  # PEFT's name for the wrapped model in saved adapter weights
# <module>.lora_A.weight / lora_B / lora_embedding_A / lora_magnitude_vector / ... (the adapter name is not saved)
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_[A-Za-z_]+|ia3_l|oft_[A-Za-z_]+|hada_[A-Za-z0-9_]+)(\.weight)?$")


class AdapterError(RuntimeError):
    """The adapter cannot be read or does not fit the base model; the message names the modules."""


def _names(v, n: int = 6) -> str:
    v = sorted(v)
    return ", ".join(v[:n]) + (f", … ({len(v)} in all)" if len(v) > n else "")


def check_fit(model: nn.Module, weights: dict, source: str) -> None:
    """Raise AdapterError naming the adapter modules the model lacks or whose LoRA shapes do not fit it."""
    modules = dict(model.named_modules())
    absent, misfit = set(), []
    for key, t in weights.items():
        m = _KEY.match(key.removeprefix(PREFIX))
        if not m:
            continue
        name, part, mod = m["module"], m["part"], modules.get(m["module"])
        if mod is None:
            absent.add(name)
        elif isinstance(mod, nn.Linear) and part in ("lora_A", "lora_B"):
            want = mod.in_features if part == "lora_A" else mod.out_features
            got = t.shape[1] if part == "lora_A" else t.shape[0]
            if got != want:
                side = "in" if part == "lora_A" else "out"
                misfit.append(f"{name} ({part}: {side}_features {got}, the model's {want})")
    problems = [f"{what}: {_names(v)}" for what, v in (("modules the model lacks", absent),
                                                       ("mis-shaped", misfit)) if v]
    if problems:
        raise AdapterError(f"adapter {source} does not fit the base model (trained on another model?) — "
                           + "; ".join(problems))


def merge_adapter(model: nn.Module, source: str) -> nn.Module:
    """The model with the PEFT adapter at source (a folder or Hub id) merged into its weights."""
    try:
        from peft import PeftConfig, PeftModel
        from peft.utils import load_peft_weights
    except ImportError as e:
        raise AdapterError("model.adapter needs peft: pip install 'llada-xp[lora]'") from e
    try:
        config = PeftConfig.from_pretrained(source)
        weights = load_peft_weights(source, device="cpu")
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot read the adapter {source} (adapter_config.json and adapter weights): {e}") from e
    if hasattr(model, "unfuse"):  # a fused LLaDA model: back to the checkpoint's modules, which adapters target
        model.unfuse()
    check_fit(model, weights, source)
    try:
        peft_model = PeftModel.from_pretrained(model, source, config=config)
    except (ValueError, RuntimeError, KeyError) as e:  # no target module found, size mismatch, ...
        raise AdapterError(f"adapter {source} does not fit the base model: {str(e).strip().splitlines()[0]}") from e
    saved = {m["module"] for k in weights if (m := _KEY.match(k.removeprefix(PREFIX)))}
    wrapped = {n.removeprefix(PREFIX) for n, mod in peft_model.named_modules()
               if hasattr(mod, "merge") and hasattr(mod, "base_layer")}
    if wrapped - saved:
        raise AdapterError(f"adapter {source} targets modules its weights do not cover (trained on another model?): "
                           f"{_names(wrapped - saved)}")
    if not hasattr(peft_model, "merge_and_unload"):
        raise AdapterError(f"adapter {source} is a {config.peft_type} adapter, which PEFT cannot merge")
    merged = peft_model.merge_and_unload()
    log.info("merged %s adapter %s into %d modules", config.peft_type, source, len(wrapped))
    return merged.eval()
