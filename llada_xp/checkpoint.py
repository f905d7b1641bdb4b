"""DCP training checkpoints → Hugging Face folders: layout detection, checks, conversion and its cache.

A torch.distributed.checkpoint folder in any layout of shared/reference/checkpoints.md becomes a folder that
loading.py loads like any other: config.json from the base model, safetensors streamed tensor by tensor (host memory:
about one tensor), the checkpoint's own tokenizer when it has one, and a provenance file. Cached conversions are keyed
by the checkpoint's fingerprint and the base model, written to a temporary folder and renamed under a file lock.
Also writes DCP checkpoints from HF folders (`python -m llada_xp.checkpoint to-dcp SRC DST`).
Knows nothing about sampling, serving or Hydra, and imports nothing of loading.py (which imports this module for
model=dcp).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import time
import uuid
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import (CheckpointException, DefaultLoadPlanner, DefaultSavePlanner,
                                          FileSystemReader, FileSystemWriter)
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from llada_xp.config import ConvertConfig, ModelConfig
from llada_xp.model import LLaDAConfig, LLaDAModelLM

log = logging.getLogger(__name__)

PROVENANCE = "llada_xp_conversion.json"
COMPLETE = ".complete"  # written last, inside the temporary folder; a folder without it is never trusted
FORMAT = 1  # bump when the converted folder's contents change meaning (invalidates every cache entry)
DEFAULT_CACHE = "~/.cache/llada_xp/converted"
DELAY_ENV = "LLADA_XP_CONVERT_DELAY"  # testing hook: seconds to sleep after each tensor (to interrupt a conversion)
DISK_MARGIN = 64 << 20  # config, tokenizer and filesystem slack on top of the weights
# Where each layout keeps its DCP folder, relative to the path the user gives (reference/checkpoints.md).
SEARCH = ("", "model", "weights", "weights/model", "policy/weights", "policy/weights/model")
ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read, checked or converted; the message names the cause (loading.py raises it
    as a ModelLoadError)."""


def looks_local(path: str) -> bool:
    """A folder path rather than a Hub id (org/name)."""
    return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path) or path.count("/") != 1


@dataclass(frozen=True)
class Layout:
    dcp: Path  # the folder holding .metadata and the __<rank>_<n>.distcp shards
    kind: str  # v1 (policy/weights) | v2 (policy/weights/model) | dcp (the folder given)
    tokenizer: Optional[Path]  # the checkpoint's tokenizer/ (tokenizer.save_pretrained output), if any


@dataclass(frozen=True)
class Base:
    name: str  # as given: a folder or a Hub id
    folder: Path  # holds config.json (the folder itself, resolved, or the Hub cache snapshot)
    config_json: bytes
    config: LLaDAConfig
    revision: Optional[str]


@dataclass(frozen=True)
class Entry:
    fqn: str  # the key inside the checkpoint ("model." + name when the state dict was {"model": ...})
    shape: tuple[int, ...]
    dtype: torch.dtype


# --- finding and fingerprinting a checkpoint ---

def find_checkpoint(path: str | os.PathLike) -> Layout:
    """The DCP folder, layout and tokenizer of a checkpoint given as a step_N/, policy/, weights/ or DCP folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path is a file, not a folder: {p}")
    for sub in SEARCH:
        d = p / sub if sub else p
        if (d / ".metadata").is_file():
            d = d.resolve()
            kind = "v2" if d.name == "model" and d.parent.name == "weights" else "v1" if d.name == "weights" else "dcp"
            root = {"v2": d.parent.parent, "v1": d.parent, "dcp": d}[kind]
            return Layout(d, kind, _tokenizer_dir(root / "tokenizer"))
    raise CheckpointError(_nothing_found(p))


def _tokenizer_dir(d: Path) -> Optional[Path]:
    if not d.is_dir():
        return None
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise CheckpointError(f"the checkpoint's tokenizer folder {d} has no tokenizer.json or tokenizer_config.json")
    return d


def _nothing_found(p: Path) -> str:
    for sub in SEARCH:
        d = p / sub if sub else p
        shards = sorted(d.glob("*.distcp")) if d.is_dir() else []
        if shards:
            return (f"incomplete checkpoint: {d} has {len(shards)} .distcp shard file(s) but no .metadata "
                    "(the save did not finish, or the folder was copied partly)")
    steps = sorted(c.name for c in p.iterdir() if c.is_dir() and re.fullmatch(r"step_\d+", c.name))
    if steps:
        return (f"{p} is a training run with {len(steps)} checkpoint(s); point model.path at one of them: "
                + ", ".join(steps[-8:]))
    found = sorted(c.name + ("/" if c.is_dir() else "") for c in p.iterdir())
    shown = ", ".join(found[:12]) + (f", … ({len(found)} entries)" if len(found) > 12 else "") or "nothing (empty)"
    return (f"no DCP checkpoint in {p}: no .metadata there or in {', '.join(s + '/' for s in SEARCH[1:])}; "
            f"it contains {shown}")


def fingerprint(layout: Layout) -> str:
    """Cheap identity of a checkpoint: .metadata's bytes, and the names, sizes and mtimes of its files."""
    h = hashlib.sha256((layout.dcp / ".metadata").read_bytes())
    for folder in (layout.dcp, layout.tokenizer):
        for f in sorted(folder.iterdir()) if folder else ():
            if f.is_file():
                st = f.stat()
                h.update(f"{folder.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


# --- the base model ---

def resolve_base(name: Optional[str], revision: Optional[str] = None) -> Base:
    """The base model's config.json (a local folder, or a Hub id through the Hugging Face cache)."""
    if not name:
        raise CheckpointError("model.base_model is required for a DCP checkpoint: the Hugging Face model "
                              "(Hub id or folder) it was trained from, which provides config.json")
    if looks_local(name):
        folder = Path(name).expanduser().resolve()
        if not folder.is_dir():
            raise CheckpointError(f"base model folder not found: {name}")
        path = folder / "config.json"
        if not path.is_file():
            raise CheckpointError(f"base model folder {folder} has no config.json")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(name, "config.json", revision=revision))
        except OSError as e:  # every hub error (offline, not found, gated, network) is an OSError
            if _offline():
                raise CheckpointError(f"base model {name!r} is not in the Hugging Face cache and the Hub is offline "
                                      f"(HF_HUB_OFFLINE): download it once (hf download {name}) or pass a local "
                                      "folder as model.base_model") from e
            raise CheckpointError(f"cannot get config.json of base model {name!r} from the Hugging Face Hub: "
                                  f"{type(e).__name__}: {e}") from e
        folder = path.parent
    raw = path.read_bytes()
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"base model {name}: config.json is not valid JSON: {e}") from e
    if d.get("model_type") != "llada":
        raise CheckpointError(f"base model {name} is a {d.get('model_type')!r} model (config.json model_type), "
                              "not LLaDA")
    try:
        config = LLaDAConfig.from_dict(d)
        config.check()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"base model {name}: invalid config.json: {e}") from e
    return Base(name, folder, raw, config, revision)


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _load_tokenizer(layout: Layout, base: Base):
    from transformers import AutoTokenizer

    import llada_xp  # noqa: F401  (registers model_type "llada", which AutoTokenizer may look up)

    src = str(layout.tokenizer) if layout.tokenizer else (str(base.folder) if looks_local(base.name) else base.name)
    kw = dict(revision=base.revision) if base.revision and not layout.tokenizer else {}
    try:
        return AutoTokenizer.from_pretrained(src, **kw), src
    except (OSError, ValueError) as e:
        where = "the checkpoint's tokenizer folder" if layout.tokenizer else "the base model"
        raise CheckpointError(f"cannot load the tokenizer from {where} {src}: {e}") from e


def _tokenizer_config(src: str, base: Base) -> Optional[Path]:
    """The tokenizer source's own tokenizer_config.json, if it has one: save_pretrained writes the loaded tokenizer's
    init kwargs, which include what from_pretrained added (local_files_only, is_local)."""
    if looks_local(src):
        path = Path(src) / "tokenizer_config.json"
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(src, "tokenizer_config.json", revision=base.revision)  # loaded just before
    return Path(cached) if isinstance(cached, str) else None


# --- reading and checking the checkpoint ---

class _Reader(FileSystemReader):
    """Reads .metadata once for the many one-tensor loads of a conversion."""

    _metadata: Optional[Metadata] = None
    _records: Optional[dict] = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata

    def records(self, fqn: str) -> list:
        """Where a tensor's bytes lie: one storage record (relative_path, offset, length) per saved chunk."""
        if self._records is None:
            self._records = {}
            for idx, info in self.read_metadata().storage_data.items():
                self._records.setdefault(idx.fqn, []).append(info)
        return self._records.get(fqn, [])


class _Slice(io.RawIOBase):
    """A read-only, seekable window [offset, offset + length) of an open file (one record of a shard)."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, (0, self.pos, self.length)[whence] + pos)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        self.f.seek(self.offset + self.pos)
        data = self.f.read(max(n, 0))
        self.pos += len(data)
        return data


def _check_crc(folder: Path, info, name: str) -> bool:
    """Check one record's CRC32s; False when it has none.

    DCP's FileSystemWriter saves each record with torch.save: a zip archive of stored entries, each with a CRC32 (0 when
    saved under torch.serialization.set_crc32_options(False)), which torch.load never checks. A record transformed by
    a writer extension (compressed) is no zip archive and is not checked.
    """
    if info.transform_descriptors:
        return False
    with open(folder / info.relative_path, "rb") as f:
        try:
            with zipfile.ZipFile(_Slice(f, info.offset, info.length)) as z:
                checked = [i for i in z.infolist() if i.CRC]
                for i in checked:
                    with z.open(i) as r:  # raises at the end of an entry whose CRC32 differs
                        while r.read(16 << 20):
                            pass
        except Exception as e:  # damaged archive structure raises many types, a bad CRC32 BadZipFile
            raise CheckpointError(f"corrupt checkpoint {folder}: shard file {info.relative_path} fails its integrity "
                                  f"check (CRC32) in tensor {name} ({type(e).__name__}: {e}); its bytes changed after "
                                  "saving (disk, copy or transfer damage): copy it again from the source") from e
    return bool(checked)


def read_entries(layout: Layout) -> tuple[dict[str, Entry], bool, _Reader]:
    """The checkpoint's tensors by Hugging Face name, whether they were wrapped in {"model": ...}, and a reader.

    Checks that every shard file exists and is long enough for the tensors .metadata places in it.
    """
    reader = _Reader(layout.dcp)
    meta_path = layout.dcp / ".metadata"
    try:
        md = reader.read_metadata()
    except Exception as e:  # unpickling arbitrary bytes can raise almost anything
        raise CheckpointError(f"cannot read {meta_path} ({type(e).__name__}: {e}): the file is corrupt or "
                              "truncated") from e
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{meta_path} does not hold torch.distributed.checkpoint metadata")
    paths = md.planner_data or {}
    wrapped, flat, other = {}, {}, []
    for fqn, m in md.state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):
            other.append(fqn)
            continue
        p = paths.get(fqn, (fqn,))
        e = Entry(fqn, tuple(m.size), m.properties.dtype)
        if len(p) == 2 and p[0] == "model" and isinstance(p[1], str):
            wrapped[p[1]] = e
        elif len(p) == 1:
            flat[fqn] = e
        else:
            raise CheckpointError(f"{layout.dcp}: tensor {fqn} is nested as {p}; expected a flat state dict or "
                                  '{"model": state_dict}')
    if wrapped and flat:
        log.warning("%s: ignoring tensors outside the \"model\" state dict: %s", layout.dcp, _names(list(flat)))
    if other:
        log.info("%s: ignoring non-tensor entries: %s", layout.dcp, _names(other))
    entries = wrapped or flat
    if not entries:
        raise CheckpointError(f"{layout.dcp} holds no tensors")
    _check_files(layout.dcp, md, {e.fqn for e in entries.values()})
    return entries, bool(wrapped), reader


def _check_files(folder: Path, md: Metadata, fqns: set[str]) -> None:
    sizes: dict[str, Optional[int]] = {}
    for idx, info in md.storage_data.items():
        if idx.fqn not in fqns:
            continue
        f = info.relative_path
        if f not in sizes:
            sizes[f] = (folder / f).stat().st_size if (folder / f).is_file() else None
        if sizes[f] is None:
            raise CheckpointError(f"incomplete checkpoint {folder}: shard file {f} (holding {idx.fqn}) is missing")
        if info.offset + info.length > sizes[f]:
            raise CheckpointError(f"truncated checkpoint {folder}: {f} has {sizes[f]} bytes but {idx.fqn} ends at "
                                  f"byte {info.offset + info.length}")


def check_weights(entries: dict[str, Entry], base: Base) -> list[str]:
    """Names the base config expects, in model order; raises naming missing, unexpected and mis-shaped tensors."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LLaDAModelLM(base.config).state_dict().items()}
    missing = [k for k in expected if k not in entries]
    unexpected = [k for k in entries if k not in expected]
    shapes = [f"{k} {list(entries[k].shape)} vs {list(s)}" for k, s in expected.items()
              if k in entries and entries[k].shape != s]
    problems = [f"{what}: {_names(v)}" for what, v in (("missing", missing), ("unexpected", unexpected),
                                                         ("mis-shaped (checkpoint vs config)", shapes)) if v]
    if problems:
        raise CheckpointError(f"the checkpoint's weights do not match base model {base.name} "
                              f"(wrong model.base_model?) — " + "; ".join(problems))
    return list(expected)


def _names(v: list[str], n: int = 6) -> str:
    return ", ".join(v[:n]) + (f", … ({len(v)} in all)" if len(v) > n else "")


# --- writing ---

def parse_size(size: str | int) -> int:
    """'2GB' (10^9), '500MiB' (2^20), '20KB' or a byte count → bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise CheckpointError(f"max_shard_size must look like 2GB, 500MB or 1GiB, got {size!r}")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise CheckpointError(f"dtype must be null (keep) or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _shards(names: list[str], nbytes: dict[str, int], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        if shards[-1] and size + nbytes[n] > limit:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes[n]
    return shards


def _write_safetensors(path: Path, items: list[tuple[str, tuple[int, ...], torch.dtype]], tensors: Iterator) -> None:
    """Stream tensors into a safetensors file: the header is known from shapes, so only one tensor is in memory."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, dt in items:
        n = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": ST_DTYPES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for (name, shape, dt), t in zip(items, tensors):
            if t.dtype != dt or tuple(t.shape) != shape:
                raise CheckpointError(f"{name}: read {t.dtype} {list(t.shape)}, expected {dt} {list(shape)}")
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def _load_one(reader: _Reader, layout: Layout, name: str, e: Entry, wrapped: bool) -> tuple[torch.Tensor, bool]:
    """The tensor, and whether all of its records carried CRC32s (they were checked before reading)."""
    checked = all([_check_crc(layout.dcp, info, name) for info in reader.records(e.fqn)])
    t = torch.empty(e.shape, dtype=e.dtype)
    try:
        dcp.load({"model": {name: t}} if wrapped else {name: t}, storage_reader=reader,
                 planner=DefaultLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as ex:  # damaged bytes raise many types; DCP wraps them in a
        # CheckpointException (a BaseException) holding each rank's (exception, traceback)
        cause = next(iter(ex.failures.values()))[0] if isinstance(ex, CheckpointException) and ex.failures else ex
        first = (str(cause).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read tensor {name} from {layout.dcp} ({type(cause).__name__}: {first}): "
                              "the checkpoint is corrupt") from ex
    return t, checked


def _convert_into(dest: Path, layout: Layout, base: Base, fp: str, key: str, dtype: Optional[torch.dtype],
                  shard_bytes: int) -> None:
    """Convert into a temporary folder beside dest, mark it complete, rename it to dest."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    import llada_xp

    t0 = time.monotonic()
    entries, wrapped, reader = read_entries(layout)
    names = check_weights(entries, base)
    out = {n: dtype if dtype is not None and entries[n].dtype.is_floating_point else entries[n].dtype for n in names}
    unsupported = sorted({str(d) for d in out.values() if d not in ST_DTYPES})
    if unsupported:
        raise CheckpointError(f"{layout.dcp}: tensors of dtype {', '.join(unsupported)} cannot be written as "
                              "safetensors here")
    nbytes = {n: math.prod(entries[n].shape) * out[n].itemsize for n in names}
    total = sum(nbytes.values())
    free = shutil.disk_usage(dest.parent).free
    if free < total + DISK_MARGIN:
        raise CheckpointError(f"not enough disk space in {dest.parent}: the converted model needs "
                              f"{_gb(total + DISK_MARGIN)}, {_gb(free)} free")
    tokenizer, tok_src = _load_tokenizer(layout, base)  # before the long part: fail early
    log.info("converting %s (%s layout, %d tensors, %s) with base model %s into %s",
             layout.dcp, layout.kind, len(names), _gb(total), base.name, dest)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        delay = float(os.environ.get(DELAY_ENV, "0") or 0)
        shards = _shards(names, nbytes, shard_bytes)
        files = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

        unchecked: list[str] = []

        def tensors(group: list[str]) -> Iterator[torch.Tensor]:
            for n in group:
                t, checked = _load_one(reader, layout, n, entries[n], wrapped)
                if not checked:
                    unchecked.append(n)
                if delay:
                    time.sleep(delay)
                bar.update(nbytes[n])  # before the yield: the writer takes a shard's last tensor and stops
                yield t.to(out[n])

        with warnings.catch_warnings(), logging_redirect_tqdm(), \
                tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=None) as bar:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            for i, (f, group) in enumerate(zip(files, shards)):
                _write_safetensors(tmp / f, [(n, entries[n].shape, out[n]) for n in group], tensors(group))
                if len(shards) > 1:  # progress where the bar is off (logs of a non-interactive job)
                    log.info("wrote %s (%d/%d)", f, i + 1, len(shards))
        if unchecked:
            log.warning("%s: %d tensor(s) carry no CRC32 (saved with CRC32s off, as safetensors or through a "
                        "compressing extension), so damage to them cannot be detected: %s", layout.dcp,
                        len(unchecked), _names(unchecked))
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: f for f, group in zip(files, shards) for n in group}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = json.loads(base.config_json)
        main_dtype = max(set(out.values()), key=lambda d: sum(nbytes[n] for n in names if out[n] == d))
        for field in [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]:
            config[field] = str(main_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(tmp)
        own_config = _tokenizer_config(tok_src, base)
        if own_config:
            shutil.copyfile(own_config, tmp / "tokenizer_config.json")
        _copy_code(base, config, tmp)
        provenance = dict(
            source=str(layout.dcp), layout=layout.kind, wrapped=wrapped, fingerprint=fp, key=key,
            base_model=str(base.folder) if looks_local(base.name) else base.name, base_revision=base.revision,
            base_config_sha256=hashlib.sha256(base.config_json).hexdigest(), tokenizer=tok_src,
            dtype=str(main_dtype).removeprefix("torch."), tensors=len(names), bytes=total,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            tool=dict(llada_xp=llada_xp.__version__, torch=torch.__version__, format=FORMAT))
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        with open(tmp / COMPLETE, "w") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s in %.1fs", layout.dcp, time.monotonic() - t0)


def _copy_code(base: Base, config: dict, dest: Path) -> None:
    """Copy the remote-code files config.json's auto_map names, so AutoModel(trust_remote_code) works too."""
    modules = {v.split(".")[0] + ".py" for v in (config.get("auto_map") or {}).values() if isinstance(v, str)}
    lacking = [m for m in sorted(modules) if not (base.folder / m).is_file()]
    for m in sorted(modules - set(lacking)):
        shutil.copyfile(base.folder / m, dest / m)
    if lacking:
        log.warning("base model %s lacks %s named by config.json's auto_map: the converted folder loads with "
                    "llada_xp, not with transformers' trust_remote_code", base.name, ", ".join(lacking))


def _gb(n: int) -> str:
    return next((f"{n / f:.1f} {u}" for u, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if n >= f), f"{n} B")


# --- the cache and the entry points ---

def cache_root(cache_dir: Optional[str] = None) -> Path:
    return Path(cache_dir or os.environ.get("LLADA_XP_CACHE") or DEFAULT_CACHE).expanduser()


def _key(fp: str, base: Base, dtype: Optional[torch.dtype]) -> str:
    where = str(base.folder) if looks_local(base.name) else base.name  # ./base, base and /abs/base: one entry
    parts = [FORMAT, fp, where, base.revision, hashlib.sha256(base.config_json).hexdigest(), str(dtype)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _label(layout: Layout) -> str:
    """A readable cache-folder name: <run>-step_N when the path has one, else the checkpoint folder's name."""
    parts = layout.dcp.parts
    steps = [i for i, p in enumerate(parts) if re.fullmatch(r"step_\d+", p)]
    if steps:
        name = "-".join(parts[max(steps[-1] - 1, 0):steps[-1] + 1])
    else:
        name = next((p for p in reversed(parts) if p not in ("model", "weights", "policy", "/")), "checkpoint")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:48]


def _trusted(folder: Path, key: str) -> bool:
    try:
        return (folder / COMPLETE).read_text().strip() == key and json.loads((folder / PROVENANCE).read_text())[
            "key"] == key
    except (OSError, ValueError, KeyError):
        return False


@contextmanager
def _locked(path: Path, what: Path):
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is converting into %s; waiting for it", what)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _produce(layout: Layout, base: Base, dest: Path, dtype: Optional[torch.dtype], shard_bytes: int,
             cache_dir: Optional[str], in_cache: bool) -> Path:
    fp = fingerprint(layout)
    key = _key(fp, base, dtype)
    if in_cache:
        dest = dest / f"{_label(layout)}-{key[:16]}"
    if _trusted(dest, key):
        log.info("reusing the conversion of %s in %s", layout.dcp, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = cache_root(cache_dir) / ".locks" / f"{hashlib.sha256(str(dest.resolve()).encode()).hexdigest()[:24]}.lock"
    with _locked(lock, dest):
        if _trusted(dest, key):
            log.info("reusing the conversion of %s in %s (another process made it)", layout.dcp, dest)
            return dest
        if dest.exists():
            if not in_cache:
                raise CheckpointError(f"output folder {dest} already exists and is not a complete conversion of "
                                      "this checkpoint: choose another output or delete it")
            log.warning("removing the untrusted cache entry %s (no completion marker)", dest)
            shutil.rmtree(dest)
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
            log.warning("removing the interrupted conversion %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        _convert_into(dest, layout, base, fp, key, dtype, shard_bytes)
    return dest


def converted_folder(cfg: ModelConfig, dtype: Optional[str] = None,
                     max_shard_size: str | int = ConvertConfig.max_shard_size) -> Path:
    """The cached Hugging Face folder of the DCP checkpoint cfg.path; converts on first use (model=dcp)."""
    if not cfg.path:
        raise CheckpointError("model.path is required for model.source=dcp (a step_N/, policy/ or DCP folder)")
    dt, shard_bytes = _dtype(dtype), parse_size(max_shard_size)
    layout = find_checkpoint(cfg.path)
    base = resolve_base(cfg.base_model, cfg.revision)
    return _produce(layout, base, cache_root(cfg.cache_dir), dt, shard_bytes, cfg.cache_dir, in_cache=True)


def convert(path: str, base_model: str, output: str, *, revision: Optional[str] = None, dtype: Optional[str] = None,
            max_shard_size: str | int = ConvertConfig.max_shard_size, cache_dir: Optional[str] = None) -> Path:
    """Convert the DCP checkpoint at path into the new folder output (kept as is when it already holds it)."""
    dt, shard_bytes = _dtype(dtype), parse_size(max_shard_size)
    layout = find_checkpoint(path)
    base = resolve_base(base_model, revision)
    return _produce(layout, base, Path(output).expanduser(), dt, shard_bytes, cache_dir, in_cache=False)


def run(cfg: ConvertConfig) -> Path:
    """convert.py: to cfg.output, or into the cache when it is None."""
    m = cfg.model
    if m.source != "dcp":
        raise CheckpointError(f"convert.py converts DCP checkpoints (model=dcp), or merges an adapter into any "
                              f"model (model.adapter=...); got model.source={m.source!r} and no adapter")
    if cfg.output is None:
        return converted_folder(m, cfg.dtype, cfg.max_shard_size)
    if not m.path:
        raise CheckpointError("model.path is required (a step_N/, policy/ or DCP folder)")
    return convert(m.path, m.base_model, cfg.output, revision=m.revision, dtype=cfg.dtype,
                   max_shard_size=cfg.max_shard_size, cache_dir=m.cache_dir)


# --- the reverse direction ---

class _SaveProgress(DefaultSavePlanner):
    """Moves a bar by each tensor's bytes once the writer is done with it (it asks for the next one, or finishes)."""

    def __init__(self, bar):
        super().__init__()
        self.bar, self.pending = bar, 0

    def resolve_data(self, write_item):
        self.bar.update(self.pending)
        data = super().resolve_data(write_item)
        self.pending = data.numel() * data.element_size() if isinstance(data, torch.Tensor) else 0
        return data


def to_dcp(src: str | os.PathLike, dst: str | os.PathLike, wrap: bool = False) -> Path:
    """Save a Hugging Face folder's weights as a DCP checkpoint in dst (flat, or {"model": ...} with wrap).

    Holds the whole state dict in memory (as a training job would).
    """
    from safetensors.torch import load_file
    from tqdm import tqdm

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_dir():
        raise CheckpointError(f"Hugging Face folder not found: {src}")
    files = sorted(src.glob("*.safetensors"))
    if not files and not (src / "pytorch_model.bin").is_file():
        raise CheckpointError(f"no *.safetensors or pytorch_model.bin in {src}")
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst} is not empty: a DCP checkpoint is saved into a new folder")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(f))
    if not files:
        sd = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    dst.mkdir(parents=True, exist_ok=True)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    with warnings.catch_warnings(), tqdm(total=total, unit="B", unit_scale=True, desc="saving", disable=None) as bar:
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        planner = _SaveProgress(bar)
        dcp.save({"model": sd} if wrap else sd, storage_writer=FileSystemWriter(dst), planner=planner, no_dist=True)
        bar.update(planner.pending)
    log.info("wrote %d tensors from %s as a DCP checkpoint in %s", len(sd), src, dst)
    return dst


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llada_xp.checkpoint",
                                description="DCP checkpoint tools (DCP → HF is convert.py).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("to-dcp", help="save a Hugging Face folder's weights as a DCP checkpoint")
    t.add_argument("src", help="a Hugging Face folder (safetensors or pytorch_model.bin)")
    t.add_argument("dst", help="a new folder for the DCP checkpoint")
    t.add_argument("--wrap", action="store_true", help='save {"model": state_dict} (v1 layout) instead of flat')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(to_dcp(args.src, args.dst, wrap=args.wrap))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
