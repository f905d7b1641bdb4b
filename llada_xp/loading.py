"""Model sources → a ready model, its tokenizer and a small info record.

Sources: the bundled demo model, a local folder in the LLaDA Hub layout (single or sharded safetensors, or
pytorch_model.bin), a Hub id (normal Hugging Face cache; offline when cached), and a DCP checkpoint (converted and
cached by checkpoint.py). Weights that do not match the config are an error naming the tensors, never a silent
random init. Knows nothing about sampling or HTTP.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llada_xp.config import ModelConfig
from llada_xp.model import LLaDAConfig, LLaDAModelLM
from llada_xp.sampler import SpecialIds

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "demo" / "model"
SMALL_MODEL = 100_000_000  # parameters; below this, auto threads = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says which source and why."""


@dataclass
class ModelInfo:
    name: str
    source: str
    path: str
    dtype: str
    device: str
    ids: SpecialIds
    max_length: int
    parameters: int
    threads: int  # torch CPU threads in use (model.threads, or its auto value)


@dataclass
class Loaded:
    model: LLaDAModelLM
    tokenizer: Any
    info: ModelInfo


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def set_threads(threads: int | None, parameters: int) -> int:
    """Apply model.threads (None = auto: 1 for a small model, else torch's default); return the count in use."""
    if threads is None and parameters < SMALL_MODEL:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def resolve_path(cfg: ModelConfig) -> str:
    """The folder or Hub id to load from, by source."""
    if cfg.source == "demo":
        return str(DEMO_DIR)
    if cfg.source == "hf":
        if not cfg.path:
            raise ModelLoadError("model.path is required for model.source=hf (a local folder or a Hub id)")
        return cfg.path
    if cfg.source == "dcp":
        from llada_xp.checkpoint import converted_folder

        return str(converted_folder(cfg))
    raise ValueError(f"model.source must be demo, hf or dcp, got {cfg.source!r}")


def _looks_local(path: str) -> bool:
    return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path) or path.count("/") != 1


def special_ids(config: LLaDAConfig, tokenizer) -> SpecialIds:
    """Mask, EOS, EoT and pad ids from the model config, checked against the tokenizer where it knows them."""
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    eot = vocab.get("<|eot_id|>")
    mask = getattr(config, "mask_token_id", None) or vocab.get("<|mdm_mask|>")
    if mask is None:
        raise ModelLoadError("no mask id: config.json has no mask_token_id and the tokenizer no <|mdm_mask|>")
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else eos
    return SpecialIds(mask=int(mask), eos=int(eos), eot=None if eot is None else int(eot), pad=int(pad))


def load_model(cfg: ModelConfig) -> Loaded:
    """Load model + tokenizer for a model config; raise ModelLoadError with the reason on any failure."""
    from transformers import AutoTokenizer

    import llada_xp  # noqa: F401  (registers model_type "llada")

    try:
        cfg.check()  # the entry points checked it already; callers of the Python API may not have
    except ValueError as e:
        raise ModelLoadError(f"model.{e}") from None
    path = resolve_path(cfg)
    local = _looks_local(path)
    if local and not Path(path).expanduser().is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    kw = dict(revision=cfg.revision) if cfg.revision else {}
    where = f"folder {path}" if local else f"Hub id {path!r}"
    try:
        config = LLaDAConfig.from_pretrained(path, **kw)
    except OSError as e:
        raise ModelLoadError(f"cannot read config.json from {where}: {e}") from e
    if config.model_type != "llada":
        raise ModelLoadError(f"{where} holds a {config.model_type!r} model, not LLaDA")
    try:
        model, info = LLaDAModelLM.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True,
                                                   ignore_mismatched_sizes=True, **kw)  # reported below, by name
    except OSError as e:
        raise ModelLoadError(f"cannot load weights from {where}: {e}") from e
    mis = [f"{k} (checkpoint {tuple(a)}, config {tuple(b)})" for k, a, b in info.get("mismatched_keys", [])]
    problems = [f"{name}: {', '.join(sorted(v))}" for name, v in (
        ("missing", info.get("missing_keys", [])), ("unexpected", info.get("unexpected_keys", [])), ("mis-shaped", mis))
        if v]
    if problems:
        raise ModelLoadError(f"weights in {where} do not match its config.json — " + "; ".join(problems))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer from {where}: {e}") from e
    model = model.to(device).eval()
    name = cfg.name or ("llada-xp-demo" if cfg.source == "demo" else Path(path.rstrip("/")).name)
    n_params = sum(p.numel() for p in model.parameters())
    threads = set_threads(cfg.threads, n_params)
    log.info("loaded %s (%s, %.1fM parameters) on %s as %s, %d CPU threads", name, where, n_params / 1e6, device,
             dtype, threads)
    return Loaded(model, tokenizer, ModelInfo(
        name=name, source=cfg.source, path=path, dtype=str(dtype).removeprefix("torch."), device=str(device),
        ids=special_ids(config, tokenizer), max_length=config.max_sequence_length, parameters=n_params,
        threads=threads))
