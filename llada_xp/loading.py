"""Model sources → a ready model, its tokenizer and a small info record.

Sources: the bundled demo model, a local folder in the LLaDA Hub layout (single or sharded safetensors, or
pytorch_model.bin), a Hub id (normal Hugging Face cache; offline when cached), and a DCP checkpoint (converted and
cached by checkpoint.py, which knows nothing of this module). A PEFT adapter (model.adapter) is merged into the weights
(adapter.py). Weights that do not match the config are an error naming the tensors, never a silent random init; a
config option the model code does not implement is an error naming it. Knows nothing about sampling or HTTP.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from llada_xp.checkpoint import DTYPES, CheckpointError, converted_folder, looks_local
from llada_xp.config import ConvertConfig, ModelConfig
from llada_xp.model import LLaDAConfig, LLaDAModelLM
from llada_xp.sampler import SpecialIds

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "demo" / "model"
SMALL_MODEL = 100_000_000  # parameters; below this, auto threads = 1


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
    bos: Optional[int] = None  # BOS id (the chat template and lm-eval take it from the tokenizer)
    adapter: Optional[str] = None  # the PEFT adapter merged into the weights


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
        try:
            return str(converted_folder(cfg))
        except CheckpointError as e:
            raise ModelLoadError(str(e)) from e
    raise ValueError(f"model.source must be demo, hf or dcp, got {cfg.source!r}")


def _first(*values) -> Optional[int]:
    """The first id given (a list's first entry: generation_config.json may list several EOS ids)."""
    for v in values:
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return None


def special_ids(config: LLaDAConfig, tokenizer, cfg: Optional[ModelConfig] = None,
                generation: Optional[dict] = None) -> SpecialIds:
    """Mask, EOS, EoT and pad ids: the model.*_token_id override, else config.json, else generation_config.json
    (`generation`), else the tokenizer; checked to lie inside the embedding."""
    o, gen = cfg or ModelConfig(), generation or {}
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    tok = (lambda name: getattr(tokenizer, name, None)) if tokenizer is not None else (lambda name: None)
    mask = _first(o.mask_token_id, config.mask_token_id, gen.get("mask_token_id"), tok("mask_token_id"),
                  vocab.get("<|mdm_mask|>"))
    if mask is None:
        raise ModelLoadError("no mask id: config.json and generation_config.json have no mask_token_id and the "
                             "tokenizer no mask token (<|mdm_mask|>): set model.mask_token_id=...")
    eos = _first(o.eos_token_id, config.eos_token_id, gen.get("eos_token_id"), tok("eos_token_id"))
    if eos is None:
        raise ModelLoadError("no EOS id: config.json, generation_config.json and the tokenizer name none: set "
                             "model.eos_token_id=...")
    eot = _first(o.eot_token_id, vocab.get("<|eot_id|>"))
    pad = _first(o.pad_token_id, config.pad_token_id, gen.get("pad_token_id"), tok("pad_token_id"), eos)
    ids = SpecialIds(mask=mask, eos=eos, eot=eot, pad=pad)
    for name in ("mask", "eos", "eot", "pad"):
        v = getattr(ids, name)
        if v is not None and not 0 <= v < config.rows:
            raise ModelLoadError(f"{name} id {v} is outside the model's {config.rows} embedding rows "
                                 f"(model.{name}_token_id overrides it)")
    if mask in (eos, eot):
        raise ModelLoadError(f"the mask id {mask} is also the EOS/EoT id (a config written with the reference code's "
                             "GPT-2 defaults?): set model.mask_token_id=...")
    return ids


def _generation_config(path: str, kw: dict) -> dict:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path, **kw).to_dict()
    except (OSError, ValueError):  # none (most LLaDA checkpoints), or unreadable: the other sources remain
        return {}


HEAD, WTE = "model.transformer.ff_out.weight", "model.transformer.wte.weight"


def _tied_head(model: LLaDAModelLM, path: str, kw: dict, missing: set, where: str) -> None:
    """weight_tying with an LM head in the checkpoint: the reference code ties ff_out to wte, and saving such a model
    keeps either name, or both. The head stands in for a missing wte; beside wte it must equal it."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **kw)
    name = json.loads(Path(index).read_text())["weight_map"][HEAD] if index else "model.safetensors"
    try:
        with safe_open(cached_file(path, name, **kw), framework="pt") as f:
            head = f.get_tensor(HEAD)
    except (OSError, KeyError) as e:
        raise ModelLoadError(f"{where}: cannot read {HEAD} (weight_tying is true): {e}") from e
    wte = model.transformer.wte.weight
    if head.shape != wte.shape:
        raise ModelLoadError(f"{where}: weight_tying is true but {HEAD} {tuple(head.shape)} is not shaped like "
                             f"the embedding {tuple(wte.shape)}")
    with torch.no_grad():
        if WTE in missing:
            wte.copy_(head)
            missing.discard(WTE)
        elif not torch.equal(head.to(wte.dtype), wte):
            raise ModelLoadError(f"{where}: weight_tying is true but the checkpoint's LM head {HEAD} differs from its "
                                 f"embedding {WTE}")


def load_model(cfg: ModelConfig) -> Loaded:
    """Load model + tokenizer for a model config; raise ModelLoadError with the reason on any failure."""
    from transformers import AutoTokenizer

    import llada_xp  # noqa: F401  (registers model_type "llada")

    try:
        cfg.check()  # the entry points checked it already; callers of the Python API may not have
    except ValueError as e:
        raise ModelLoadError(f"model.{e}") from None
    path = resolve_path(cfg)
    local = looks_local(path)
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
        config.check()
    except ValueError as e:
        raise ModelLoadError(f"{where}: {e}") from None
    try:
        model, info = LLaDAModelLM.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True,
                                                   ignore_mismatched_sizes=True, **kw)  # reported below, by name
    except OSError as e:
        raise ModelLoadError(f"cannot load weights from {where}: {e}") from e
    missing, unexpected = set(info.get("missing_keys", [])), set(info.get("unexpected_keys", []))
    if config.weight_tying and HEAD in unexpected:
        _tied_head(model, path, kw, missing, where)
        unexpected.discard(HEAD)
    mis = [f"{k} (checkpoint {tuple(a)}, config {tuple(b)})" for k, a, b in info.get("mismatched_keys", [])]
    problems = [f"{name}: {', '.join(sorted(v))}" for name, v in (
        ("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis)) if v]
    if problems:
        raise ModelLoadError(f"weights in {where} do not match its config.json — " + "; ".join(problems))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer from {where}: {e}") from e
    ids = special_ids(config, tokenizer, cfg, _generation_config(path, kw))
    model = model.to(device).eval()
    if cfg.adapter:
        from llada_xp.adapter import AdapterError, merge_adapter

        try:
            model = merge_adapter(model, cfg.adapter)
        except AdapterError as e:
            raise ModelLoadError(str(e)) from e
    model.fuse()  # q/k/v and gate/up as one matmul each, after any adapter merge (PEFT targets the parts)
    if cfg.compile:
        model.compile_block_step()
    name = cfg.name or ("llada-xp-demo" if cfg.source == "demo" else Path(path.rstrip("/")).name)
    n_params = sum(p.numel() for p in model.parameters())
    threads = set_threads(cfg.threads, n_params)
    log.info("loaded %s (%s%s, %.1fM parameters) on %s as %s, %d CPU threads", name, where,
             f" + adapter {cfg.adapter}" if cfg.adapter else "", n_params / 1e6, device, dtype, threads)
    bos = _first(getattr(config, "bos_token_id", None), getattr(tokenizer, "bos_token_id", None))
    return Loaded(model, tokenizer, ModelInfo(
        name=name, source=cfg.source, path=path, dtype=str(dtype).removeprefix("torch."), device=str(device),
        ids=ids, max_length=config.max_sequence_length, parameters=n_params, threads=threads, bos=bos,
        adapter=cfg.adapter))


def write_merged(cfg: ConvertConfig) -> Path:
    """convert.py with model.adapter: the model (any source) with its adapter merged, written as a new Hugging Face
    folder at cfg.output (merged in float32, or float64; saved in cfg.dtype, else the dtype of the source's
    config.json). Holds the whole model in host memory."""
    if not cfg.output:
        raise ModelLoadError("output= is required with model.adapter: a merged model is written to a folder of its "
                             "own, not to the conversion cache")
    out = Path(cfg.output).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelLoadError(f"output folder {out} already exists: choose another output or delete it")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be null (keep) or one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    loaded = load_model(replace(cfg.model, device="cpu", dtype="float64" if cfg.dtype == "float64" else "float32"))
    saved = getattr(loaded.model.config, "dtype", None)
    saved = DTYPES.get(str(saved).removeprefix("torch."), torch.float32) if cfg.dtype is None else DTYPES[cfg.dtype]
    model = loaded.model.unfuse().to(saved)  # saved under the checkpoint's names, without split copies
    model.config.dtype = saved
    for name in ("mask_token_id", "eos_token_id", "pad_token_id"):  # overrides become the merged model's own
        if getattr(cfg.model, name) is not None:
            setattr(model.config, name, getattr(cfg.model, name))
    model.save_pretrained(out, max_shard_size=cfg.max_shard_size)
    loaded.tokenizer.save_pretrained(out)
    (out / "llada_xp_merge.json").write_text(json.dumps(dict(
        source=loaded.info.path, adapter=cfg.model.adapter, dtype=str(saved).removeprefix("torch.")), indent=2) + "\n")
    log.info("wrote %s with adapter %s merged into %s", loaded.info.path, cfg.model.adapter, out)
    return out
