"""The sampler core: LLaDA / Fast-dLLM block diffusion decoding of a running set of rows, in ONE block loop.

Cache mode (none | prefix | dual) and transfer rule (quota | threshold | factor) are data, not copies of the loop.
Rules and quirks: shared/reference/sampling.md (LLaDA generate.py; Fast-dLLM llada/generate.py). Knows nothing
about HTTP, Hydra or W&B; every path that generates text (serve, eval, bench) goes through `RunningSet.step`
(`Sampler.generate` = add every row, step until empty).

Continuous batching. A `RunningSet` holds rows, each at its own block and step within its own canvas (prompt +
gen_length columns); `add` hands a row over at any time, it starts at the next `step`; a row leaves when it finishes
or is aborted; a row whose block is complete starts its next block at the next step. Nothing has to be shared
(`shared_key` is empty): block_length, cache, cfg_scale, the EOS options, early_stop, gen_length, steps, rule,
temperature, seed and stop are all per row.
- Layout: canvas row i lives in slot i of one [slots, width] tensor, from column 0 (right-padded with the pad id),
  and in cache row i of the model's KV cache (cfg: a second cache row for the unconditional copy). Positions are
  canvas columns, so RoPE gets the same numbers as alone; a key mask hides the columns past the row's canvas.
  Forwards gather each row's query columns ([B, n] indices) and pass them as positions and cache columns
  (`model(..., input_pos=, cache_rows=)`); a shorter row's padding queries point at its first column past the
  canvas (width = longest canvas + 1), so their K/V land where no key is read. Freed slots are reused; the
  tensors grow when a longer or an extra row joins and are released when the set empties.
- Forwards per step: rows are grouped by the forward they need — `full` (no cache every step, and a cache mode's
  block start: the whole canvas, filling the row's cache), `prefix` (block and everything right of it against the
  cached prefix) and `dual` (the block only) — and each group takes ONE forward. Every row takes part in exactly one
  forward per step, so its NFE is its NFE alone and no row idles in a forward. A step costs one forward per kind
  present: 1 when all rows are at the same kind (always with cache=none; with a cache, the steps where no row
  starts a block), 2 when some rows start a block while others are mid-block (one cache mode), 3 at most (prefix
  and dual rows mixed). Why not one mixed forward: the starting rows need every canvas column as queries, the
  others one block; padding everyone to the full canvas costs (canvas / block) times the compute of the cached rows
  (8x at gen 256, block 32) — and ragged attention is not portable (SDPA, CPU) — while a second forward over the
  starting rows costs what their block start costs anyway plus, on a GPU where small batches are bound by reading
  the weights, one more weight read. Cached forwards read the rows' cache rows with an index (a copy of their K/V)
  unless the group is every cache row in order.
- Host synchronisations: ONE per step at temperature 0, in `step`: every forward group's commit leaves a small
  status tensor on the device (per row: tokens committed, then the block's tokens after the commit), the groups'
  statuses are concatenated and copied to host memory (on CUDA: non-blocking into pinned memory, then one stream
  synchronize; on CPU: `.tolist()`), and the host reads it for the stop checks, streaming and the next step. Nothing
  else waits for the device: the masked columns of each row's block are known on the host from the previous status
  (all columns at a block start), so the float64 softmax runs on exactly those [M, V] rows, gathered with an index
  built on the host; per-step settings and indices go host → device as non-blocking copies from pinned memory on
  CUDA. Per-row loops only where a row's own generator draws (temperature > 0, `random` remasking; no sync either).
  The forward timer does not synchronise unless the sampler is made with `timing=True`: by default `forward_s` is
  the host time spent inside the model call, which on a GPU is the launch time of the forward, not its run time (on
  CPU the two are the same); `timing=True` synchronises after each forward (one more sync per forward group) and
  measures the wall time of the forward, as the bench's sampler breakdown does.

Documented rules beyond the references (identical to them whenever their preconditions hold):
- gen_length not divisible by block_length: the last block is shorter.
- steps are spread over blocks in proportion to their length, at least one and at most one per column each
  (`block_steps`); steps/num_blocks per block when it divides. A step that could commit nothing is not run (LLaDA's
  generate would run it, with the same tokens).
- threshold/factor modes loop until the block has no masks (never leaves masks behind).
- Ties in confidence go to the leftmost column.
- Randomness: each row owns a torch.Generator (seeded from its seed; without one, from torch's global RNG, drawn
  only by rows that draw: temperature > 0 or `random` remasking). Per step and row, temperature > 0 draws
  u ~ U[0,1) float64 of shape [masked columns of the block, vocab] (column order), then `random` remasking draws
  [masked columns] float64. Temperature 0 draws nothing. So a row's tokens do not depend on its batch, nor on when
  it joined.
- confidence_eos_eot_inf: confidence = softmax with EOS and EoT logits at -inf (the reference does this only at
  temperature 0, a known bug; here at every temperature).
- The mask id is never predicted (the references would loop forever or leave it in the answer).
- Confidence is the float64 softmax of the raw logits at x0 (Fast-dLLM; LLaDA before June 2025).
- An aborted row ends at the next step, before its forward.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from llada_xp.config import SamplerConfig


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the sampler needs, read from the model/tokenizer config (never literals)."""

    mask: int
    eos: int
    eot: Optional[int] = None
    pad: Optional[int] = None  # left-padding id; defaults to eos

    @property
    def stops(self) -> tuple[int, ...]:
        return tuple(i for i in (self.eos, self.eot) if i is not None)


@dataclass
class Request:
    """One prompt to complete. `abort()` may be called from another thread; the row stops within one step."""

    prompt: list[int]
    settings: SamplerConfig = field(default_factory=SamplerConfig)
    aborted: bool = False

    def abort(self) -> None:
        self.aborted = True


@dataclass
class Stats:
    nfe: int = 0  # model forwards this row took part in (block-start full forwards count once)
    steps: int = 0  # denoising steps (= nfe; kept apart for clarity in reports)
    blocks: int = 0  # blocks entered
    committed: int = 0  # canvas columns committed while the row was active (EOS tail included)
    wall_s: float = 0.0  # from the row's admission (the step it started) until it finished
    forward_s: float = 0.0  # time inside the model forwards the row took part in

    @property
    def tokens_per_forward(self) -> float:
        return self.committed / self.nfe if self.nfe else 0.0


@dataclass
class Result:
    tokens: list[int]  # the answer, cut before the first EOS / EoT / stop id, or after the token completing a stop string
    text: Optional[str]  # decoded answer, cut before a stop string (None without a decode function)
    finish_reason: str  # stop | length | abort
    stop: Union[int, str, None]  # the stop token id or stop string that ended the answer
    stats: Stats


@dataclass
class Tokens:
    """Event: tokens of row `index` that became final (the committed contiguous prefix grew)."""

    index: int
    tokens: list[int]


@dataclass
class Finished:
    """Event: row `index` is done; its result is final."""

    index: int
    result: Result


def shared_key(s: SamplerConfig) -> tuple:
    """Settings that must be equal for requests to share a batch: none since rows run at their own block (kept for
    callers that group requests; a row's forward kind is chosen per step, not per batch)."""
    return ()


def block_steps(steps: int, gen_length: int, block_length: int) -> list[int]:
    """Steps of each block: proportional to block length; steps // num_blocks each when that divides."""
    nb = -(-gen_length // block_length)
    edges = [min(b * block_length, gen_length) for b in range(nb + 1)]
    return [max(1, min(steps * edges[b + 1] // gen_length - steps * edges[b] // gen_length, edges[b + 1] - edges[b]))
            for b in range(nb)]


def quota(masks: int, steps: int) -> list[int]:
    """Tokens per step for a block: masks spread over steps, the first masks % steps steps get one more."""
    base, rem = divmod(masks, steps)
    return [base + (i < rem) for i in range(steps)]


def factor_count(sorted_conf: torch.Tensor, m: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Fast-dLLM's dynamic rule, with its quirk. sorted_conf: [B, n] descending; m: [B] masked; factor: [B].

    Rank n (1-based) passes when c_n >= 1 - factor / (n + 1); rank 1 always passes. Take the ranks before the first
    failure; if the first failure is the last candidate (or none fails), take all candidates.
    """
    n = sorted_conf.shape[1]
    ranks = torch.arange(1, n + 1, device=sorted_conf.device, dtype=torch.float64)
    thr = 1 - factor[:, None].double() / (ranks + 1)
    thr[:, 0] = -1.0
    fail = (sorted_conf < thr) & (ranks[None] <= m[:, None])
    first = torch.where(fail.any(-1), fail.double().argmax(-1), m)  # 0-based index of the first failing rank
    return torch.where(first >= m - 1, m, first)


class Sampler:
    """Decodes requests with one model. Not thread-safe: one caller at a time (the engine's worker), and one
    RunningSet at a time (the model owns the KV cache)."""

    def __init__(self, model, ids: SpecialIds, decode: Optional[Callable[[list[int]], str]] = None,
                 timing: bool = False):
        self.model, self.ids, self.decode = model, ids, decode
        self.timing = timing  # synchronise after each forward so that Stats.forward_s is its wall time (on a GPU)
        self.max_length = getattr(model.config, "max_sequence_length", None)

    # ------------------------------------------------------------------ public
    def check(self, request: Request) -> None:
        """Raise ValueError naming the problem if `request` cannot run."""
        request.settings.check()
        if not request.prompt:
            raise ValueError("prompt is empty")
        n, g = len(request.prompt), request.settings.gen_length
        if self.max_length and n + g > self.max_length:
            raise ValueError(f"prompt ({n} tokens) + gen_length ({g}) = {n + g} exceeds the model's "
                             f"max_sequence_length {self.max_length}")

    def running(self, on_event: Optional[Callable] = None) -> "RunningSet":
        """An empty running set: `add` rows whenever, `step` until it is empty."""
        return RunningSet(self, on_event or (lambda e: None))

    def generate(self, requests: list[Request], on_event: Optional[Callable] = None) -> list[Result]:
        """Decode all requests together (event and result index = position in `requests`): the running set with
        every row added at once, stepped until empty. Events (Tokens, Finished) go to `on_event` as they happen."""
        for r in requests:
            self.check(r)
        results: list[Optional[Result]] = [None] * len(requests)

        def collect(e):
            if isinstance(e, Finished):
                results[e.index] = e.result
            if on_event is not None:
                on_event(e)

        rs = self.running(collect)
        try:
            for i, r in enumerate(requests):
                rs.add(r, i)
            while rs:
                rs.step()
        finally:
            rs.close()
        return results

    def feed(self, requests: dict[int, Request], batches: list[list[int]], batch_size: int, how: str,
             on_finished: Callable) -> None:
        """Decode `requests` (by key) through running sets; on_finished(key, result, run id, run_s, run_forwards) as
        each finishes (run_s / run_forwards: the run's time and forwards so far). What eval.py and the lm-eval
        adapter decode with.

        continuous: one stream of the batches' keys in order, refilled as rows finish (at steps where joining costs
        no extra forward, or once the set is half empty), so at most batch_size rows decode until the stream runs
        out (one run); static: batch after batch, each run to its end (one run each)."""
        if how not in ("continuous", "static"):
            raise ValueError(f"how must be continuous or static, got {how!r}")
        streams = [[i for b in batches for i in b]] if how == "continuous" else [b for b in batches if b]
        for stream in streams:
            pending = deque(stream)
            run_id, t0 = uuid.uuid4().hex[:8], time.perf_counter()

            def on_event(ev, run_id=run_id, t0=t0):
                if isinstance(ev, Finished):
                    on_finished(ev.index, ev.result, run_id, time.perf_counter() - t0, rs.forwards)

            rs = self.running(on_event)
            try:
                while pending or rs:
                    if rs.joins_free or len(rs) <= batch_size // 2:
                        while pending and len(rs) < batch_size:
                            i = pending.popleft()
                            rs.add(requests[i], i)
                    rs.step()
            finally:
                rs.close()


class _Row:
    """A request in the running set: its canvas (prompt + gen_length columns, right-padded) in slot `slot` of the
    set's tensors and cache (`uslot`: the unconditional copy's cache row with cfg), its own block and step."""

    def __init__(self, key, req: Request, ids: SpecialIds, dev):
        st = self.st = req.settings
        self.key, self.req = key, req
        self.Lp, self.G = len(req.prompt), st.gen_length
        self.C = self.Lp + self.G
        self.sched = block_steps(st.steps, st.gen_length, st.block_length)
        self.b, self.s, self.e, self.step, self.plan = -1, self.Lp, self.Lp, 0, []
        self.left = 0  # masked columns left in the current block; 0 = enter the next block at the next step
        self.masked: list[int] = []  # the current block's masked columns (offsets from s), from the last status
        self.answer: list[int] = []  # host copy of the committed contiguous prefix of the answer
        self.end: Optional[tuple[int, int]] = None  # (answer length, stop id) once a stop id is final
        self.stats = Stats()
        self.stop_ids = set(ids.stops) | set(st.stop_token_ids)
        self.slot: int = -1
        self.uslot: Optional[int] = None
        self.gen = torch.Generator(device=dev)
        if st.seed is not None:
            self.gen.manual_seed(st.seed)
        elif st.temperature > 0 or st.remasking == "random":  # temperature 0 draws nothing, not even a seed
            self.gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self.t0 = time.perf_counter()

    @property
    def kind(self) -> str:
        """The forward this row needs now: a full canvas forward (no cache; a cache mode's block start), else its
        cache mode's cached forward."""
        return "full" if self.st.cache == "none" or self.step == 0 else self.st.cache

    def enter_next_block(self) -> None:
        self.b += 1
        bl = self.st.block_length
        self.s = self.Lp + self.b * bl
        self.e = min(self.s + bl, self.C)
        self.step, self.left = 0, self.e - self.s
        self.masked = list(range(self.e - self.s))
        self.plan = quota(self.e - self.s, self.sched[self.b])  # the block is all masks when it starts
        self.stats.blocks += 1


class RunningSet:
    """The rows decoding now, each at its own block and step; see the module docstring."""

    def __init__(self, sampler: Sampler, on_event):
        self.s, self.emit = sampler, on_event
        self.dev = next(sampler.model.parameters()).device
        self.pad = sampler.ids.pad if sampler.ids.pad is not None else sampler.ids.eos
        self.rows: list[_Row] = []  # admitted, in admission order
        self.joining: list[_Row] = []  # added, admitted at the next step
        self.x: Optional[torch.Tensor] = None  # [slots, width] canvases, right-padded with pad (never the mask id)
        self.free: list[int] = []  # free slots
        self.cached = False  # the model's KV cache holds a row for every slot
        self.forwards = 0  # model calls of this set (each counts 1 NFE for every row in it)

    def __len__(self) -> int:
        return len(self.rows) + len(self.joining)

    @property
    def joins_free(self) -> bool:
        """Would a row added now cost no extra forward? True when the set is empty or some row takes a whole-canvas
        forward at the next step anyway (it starts a block, has no cache, or is joining): a joining row needs one."""
        return not self.rows or bool(self.joining) or any(r.left == 0 or r.st.cache == "none" for r in self.rows)

    def add(self, request: Request, key) -> None:
        """Hand a row over; it starts at the next `step`. Events of this row carry `key` as their index."""
        self.s.check(request)
        self.joining.append(_Row(key, request, self.s.ids, self.dev))

    def close(self) -> None:
        """Release the canvases and the model's KV cache (the set stays usable)."""
        if self.cached:
            self.s.model.clear_cache()
        self.x, self.free, self.cached = None, [], False

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> None:
        """One denoising step of every row: admit joining rows, move rows with a complete block to their next one,
        one forward per kind of row present (full, prefix, dual), commit, emit, finish."""
        self._admit()
        for row in [r for r in self.rows if r.req.aborted]:  # aborted before its forward: no NFE spent
            self._finish(row, "abort", None, row.end[0] if row.end else len(row.answer))
        for row in self.rows:
            if row.left == 0:
                row.enter_next_block()
        groups = {kind: sorted((r for r in self.rows if r.kind == kind), key=lambda r: r.slot)
                  for kind in ("full", "prefix", "dual")}
        done = [(group, self._decode(kind, group)) for kind, group in groups.items() if group]
        host = self._to_host(torch.cat([status.flatten() for _, status in done])) if done else []  # the one sync
        blocks: dict[int, list[int]] = {}
        at = 0
        for group, status in done:
            w = status.shape[1]
            for r in group:
                c, *blk = host[at:at + w]
                at += w
                r.stats.committed += c
                r.step += 1
                blocks[r.slot] = blk[:r.e - r.s]
        for row in list(self.rows):
            self._after_step(row, blocks[row.slot])
        if not self:
            self.close()

    def _to_dev(self, data, dtype=torch.long) -> torch.Tensor:
        """A host list as a device tensor without waiting: non-blocking from pinned memory on CUDA."""
        t = torch.tensor(data, dtype=dtype)
        if self.dev.type == "cuda":
            return t.pin_memory().to(self.dev, non_blocking=True)
        return t.to(self.dev)

    def _to_host(self, t: torch.Tensor) -> list:
        """A device tensor as a host list: the step's one host synchronisation."""
        if self.dev.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            torch.cuda.current_stream(self.dev).synchronize()
            return host.tolist()  # a host tensor: no further wait
        return t.tolist()

    def _admit(self) -> None:
        """Give joining rows slots (and cache rows) and write their canvases."""
        if not self.joining:
            return
        new, self.joining = self.joining, []
        need = sum(1 + (r.st.cfg_scale > 0) for r in new)
        width = max(r.C for r in self.rows + new) + 1  # + 1: a spare column where padded queries write
        slots = 0 if self.x is None else self.x.shape[0]
        if len(self.free) < need:
            self.free += range(slots, slots + need - len(self.free))
            self.free.sort()
        S = max(slots, self.free[-1] + 1)
        if self.x is None:
            self.x = torch.full((S, width), self.pad, dtype=torch.long, device=self.dev)
        elif S > self.x.shape[0] or width > self.x.shape[1]:
            x = torch.full((S, max(width, self.x.shape[1])), self.pad, dtype=torch.long, device=self.dev)
            x[:self.x.shape[0], :self.x.shape[1]] = self.x
            self.x = x
        width = self.x.shape[1]
        canv = torch.full((len(new), width), self.pad, dtype=torch.long)
        for j, r in enumerate(new):
            r.slot = self.free.pop(0)
            if r.st.cfg_scale > 0:
                r.uslot = self.free.pop(0)
            canv[j, :r.Lp] = torch.tensor(r.req.prompt, dtype=torch.long)
            canv[j, r.Lp:r.C] = self.s.ids.mask
            r.t0 = time.perf_counter()
        if self.dev.type == "cuda":
            canv = canv.pin_memory()
        self.x[self._to_dev([r.slot for r in new])] = canv.to(self.dev, non_blocking=True)
        self.rows += new
        if self.cached or any(r.st.cache != "none" for r in self.rows):
            if not self.cached:  # whatever another user left there is not ours (and may be uninitialised)
                self.s.model.clear_cache()
            self.s.model.grow_cache(S, width)
            self.cached = True

    def _decode(self, kind: str, group: list[_Row]) -> torch.Tensor:
        """One forward of `group` (rows of one kind), then its commit; returns its status (device, see _commit)."""
        dev, B = self.dev, len(group)
        n = [r.e - r.s for r in group]
        nb = max(n)
        # block columns [B, nb]: s..e of each row; a shorter block is padded with the row's pad column C
        bcols = self._to_dev([[r.s + j if j < k else r.C for j in range(nb)] for r, k in zip(group, n)])
        C = self._to_dev([r.C for r in group])
        slot = self._to_dev([r.slot for r in group])
        if kind == "full":  # whole canvases from column 0; the logits of the block columns only
            width = max(r.C for r in group)
            cols = torch.arange(width, device=dev).expand(B, width)
            keys, lidx = width, bcols.clamp(max=width - 1)
        elif kind == "prefix":  # the block and everything right of it, against the cached prefix
            width = max(r.C - r.s for r in group)
            cols = self._to_dev([[r.s + j if r.s + j < r.C else r.C for j in range(width)] for r in group])
            keys, lidx = max(r.C for r in group), slice(0, nb)
        else:  # dual: the block only; its fresh K/V overwrite its columns, prefix and suffix stay frozen
            cols, keys, lidx = bcols, max(r.C for r in group), None
        inp = self.x[slot[:, None], cols]
        key_mask = torch.arange(keys, device=dev)[None] < C[:, None]
        lanes = [r.slot for r in group]
        cfg = [(i, r) for i, r in enumerate(group) if r.st.cfg_scale > 0]
        if cfg:  # unconditional copies (prompt columns masked) in the same forward, in their own cache rows
            ci = self._to_dev([i for i, _ in cfg])
            lp = self._to_dev([r.Lp for _, r in cfg])
            inp = torch.cat([inp, torch.where(cols[ci] < lp[:, None], self.s.ids.mask, inp[ci])])
            cols, key_mask = torch.cat([cols, cols[ci]]), torch.cat([key_mask, key_mask[ci]])
            lanes += [r.uslot for _, r in cfg]
            if isinstance(lidx, torch.Tensor):
                lidx = torch.cat([lidx, lidx[ci]])
        rows = None if lanes == list(range(self.x.shape[0])) else self._to_dev(lanes)
        t = time.perf_counter()
        logits = self.s.model(inp, attention_mask=key_mask, use_cache=self.cached, logits_slice=lidx,
                              input_pos=cols, cache_rows=rows).logits
        if self.s.timing and dev.type == "cuda":  # only when asked: a sync per forward (module docstring)
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t
        self.forwards += 1
        for r in group:
            r.stats.nfe += 1
            r.stats.steps += 1
            r.stats.forward_s += dt
        if cfg:
            cond, un = logits[:B], logits[B:]
            for j, (i, r) in enumerate(cfg):
                cond[i] = un[j] + (r.st.cfg_scale + 1) * (cond[i] - un[j])
            logits = cond
        return self._commit(group, slot, bcols, logits)

    def _commit(self, group: list[_Row], slot, bcols, logits) -> torch.Tensor:
        """Predict x0 at masked block columns, score confidence, select per row, write. logits: [B, nb, V].

        Returns the status [B, 1 + nb] (device): tokens committed, then the block's tokens after the commit. The
        masked columns come from the host (`_Row.masked`), so nothing here waits for the device."""
        ids, dev = self.s.ids, self.dev
        xb = self.x[slot[:, None], bcols]  # [B, nb]
        masked = xb == ids.mask  # pad columns are never masks
        logits[..., ids.mask] = -torch.inf  # the mask id is never a prediction (a committed mask would never end)
        eos_rows = [i for i, r in enumerate(group) if r.st.logits_eos_inf]
        if eos_rows:
            logits[self._to_dev(eos_rows), :, ids.eos] = -torch.inf
        B, n, V = logits.shape
        # the masked columns, row-major like masked.nonzero(): at = (row, column) [M] each
        ar = [i for i, r in enumerate(group) for _ in r.masked]
        ac = [c for r in group for c in r.masked]
        at = tuple(self._to_dev([ar, ac]))
        pred = logits.argmax(-1)  # temperature 0: plain argmax, no draw
        for i, r in enumerate(group):
            if r.st.temperature > 0:  # Gumbel-max in float64: exp(l) / (-log u)^T
                cols = self._to_dev(r.masked)
                u = torch.rand((len(r.masked), V), dtype=torch.float64, device=dev, generator=r.gen)
                pred[i, cols] = (logits[i, cols].double().exp() / (-torch.log(u)) ** r.st.temperature).argmax(-1)
        lc = logits[at].double()  # [M, V]: float64 softmax only where masked
        if any(r.st.confidence_eos_eot_inf for r in group):
            stops = torch.zeros(V, dtype=torch.bool, device=dev)
            stops[list(ids.stops)] = True
            rowflag = self._to_dev([r.st.confidence_eos_eot_inf for r in group for _ in r.masked], torch.bool)
            lc.masked_fill_(rowflag[:, None] & stops, -torch.inf)
        conf = torch.full((B, n), -torch.inf, dtype=torch.float64, device=dev)
        conf[at] = torch.softmax(lc, -1).gather(-1, pred[at][:, None]).squeeze(-1)
        for i, r in enumerate(group):
            if r.st.remasking == "random":
                cols = self._to_dev(r.masked)
                conf[i, cols] = torch.rand((len(r.masked),), dtype=torch.float64, device=dev, generator=r.gen)
        m = masked.sum(-1)
        sorted_conf, order = torch.sort(conf, dim=-1, descending=True, stable=True)
        settings = self._to_dev([[r.st.threshold if r.st.threshold is not None else 2.0, r.st.factor or 0.0,
                                  r.st.threshold is not None, r.st.factor is not None,
                                  r.plan[r.step] if r.step < len(r.plan) else 0] for r in group], torch.float64)
        thr, fac = settings[:, 0], settings[:, 1]
        use_thr, use_fac, k_quota = settings[:, 2] > 0, settings[:, 3] > 0, settings[:, 4].long()
        k_thr = (sorted_conf >= thr[:, None]).sum(-1).clamp(min=1)
        k = torch.where(use_fac, factor_count(sorted_conf, m, fac), torch.where(use_thr, k_thr, k_quota))
        k = torch.minimum(k, m)
        take = torch.arange(n, device=dev)[None] < k[:, None]
        select = torch.zeros_like(masked).scatter(-1, order, take)
        new = torch.where(select, pred, xb)
        self.x[slot[:, None], bcols] = new
        return torch.cat([k[:, None], new], 1)

    def _after_step(self, row: _Row, blk: list[int]) -> None:
        """Emit newly final tokens; finish the row if it hit a stop, was aborted, or completed its canvas.

        early_stop governs EOS/EoT only; stop strings and stop ids always end the row at once.
        """
        mask = self.s.ids.mask
        row.masked = [j for j, t in enumerate(blk) if t == mask]
        row.left = len(row.masked)
        base, old = row.s - row.Lp, len(row.answer)  # earlier blocks are complete: old >= base
        new = base + next((j for j, t in enumerate(blk) if t == mask), len(blk))
        fresh = blk[old - base:new - base]
        row.answer += fresh
        if row.req.aborted:
            return self._finish(row, "abort", None, row.end[0] if row.end else new)
        if row.end is None:
            cut = next((j for j, t in enumerate(fresh) if t in row.stop_ids), None)
            if cut is not None:
                row.end = (old + cut, fresh[cut])
                fresh = fresh[:cut]
            if fresh:
                self.emit(Tokens(row.key, fresh))
                # the text before a stop id committed in this same step is checked too: with threshold
                # decoding a whole block (answer, stop string and EoT) often commits in one step
                hit = self._stop_string(row, row.answer[:old], fresh)
                if hit is not None:
                    return self._finish(row, "stop", *hit)
        if row.end is not None:
            end, tok = row.end
            if tok not in self.s.ids.stops or row.st.early_stop or new == row.G:
                return self._finish(row, "stop", tok, end)
        elif new == row.G:
            self._finish(row, "length", None, new)

    def _stop_string(self, row: _Row, before: list[int], fresh: list[int]) -> Optional[tuple[str, int]]:
        """(the earliest stop string in the answer, answer length in tokens) once `fresh` completes one, else None.

        The answer keeps tokens up to the one that completes the stop string (the text is cut before it in
        `_finish`), like vLLM. Stop strings were checked at every earlier step, so `before` holds none.
        """
        st, decode = row.st, self.s.decode
        if not st.stop or decode is None:
            return None
        text = decode(before + fresh)
        hits = [(text.find(w), w) for w in st.stop if w and w in text]
        if not hits:
            return None
        word = min(hits)[1]
        end = next(k for k in range(len(before) + 1, len(before) + len(fresh) + 1)
                   if word in decode((before + fresh)[:k]))
        return word, end

    def _finish(self, row: _Row, reason: str, stop, end: int) -> None:
        tokens = row.answer[:end]
        text = self.s.decode(tokens) if self.s.decode is not None else None
        if isinstance(stop, str) and text is not None:
            text = text[:text.find(stop)]
        row.stats.wall_s = time.perf_counter() - row.t0
        result = Result(tokens, text, reason, stop, row.stats)
        self.rows.remove(row)
        self.free += [row.slot] + ([row.uslot] if row.uslot is not None else [])
        self.free.sort()
        self.emit(Finished(row.key, result))
