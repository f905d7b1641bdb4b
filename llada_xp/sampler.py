"""The sampler core: LLaDA / Fast-dLLM block diffusion decoding of a batch of prompts, in ONE block loop.

Cache mode (none | prefix | dual) and transfer rule (quota | threshold | factor) are data, not copies of the loop.
Rules and quirks: shared/reference/sampling.md (LLaDA generate.py; Fast-dLLM llada/generate.py). Knows nothing
about HTTP, Hydra or W&B; every path that generates text (serve, eval, bench) goes through `Sampler.generate`.

Per batch, these settings must agree (`shared_key`): block_length, cache, cfg_scale, logits_eos_inf,
confidence_eos_eot_inf, early_stop. Everything else may differ per row: gen_length and steps (each row follows its
own block/step schedule inside the batch canvas), temperature, threshold, factor, remasking, seed, stop.

Documented rules beyond the references (identical to them whenever their preconditions hold):
- gen_length not divisible by block_length: the last block is shorter.
- steps are spread over blocks in proportion to their length, at least one and at most one per column each
  (`block_steps`); steps/num_blocks per block when it divides. A step that could commit nothing is not run (LLaDA's
  generate would run it, with the same tokens).
- threshold/factor modes loop until the block has no masks (never leaves masks behind).
- Ties in confidence go to the leftmost column.
- Randomness: each row owns a torch.Generator (seeded from its seed). Per step and row, temperature > 0 draws
  u ~ U[0,1) float64 of shape [masked columns of the block, vocab] (column order), then `random` remasking draws
  [masked columns] float64. Temperature 0 draws nothing. So a row's tokens do not depend on its batch.
- confidence_eos_eot_inf: confidence = softmax with EOS and EoT logits at -inf (the reference does this only at
  temperature 0, a known bug; here at every temperature).
- The mask id is never predicted (the references would loop forever or leave it in the answer).
- Confidence is the float64 softmax of the raw logits at x0 (Fast-dLLM; LLaDA before June 2025).
"""

from __future__ import annotations

import time
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
    wall_s: float = 0.0  # from batch start until the row finished
    forward_s: float = 0.0  # time inside model forwards while the row was active

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
    """Settings that must be equal for requests to share a batch."""
    return (s.block_length, s.cache, s.cfg_scale, s.logits_eos_inf, s.confidence_eos_eot_inf, s.early_stop)


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
    """Decodes batches of requests with one model. Not thread-safe: one caller at a time (the engine's worker)."""

    def __init__(self, model, ids: SpecialIds, decode: Optional[Callable[[list[int]], str]] = None):
        self.model, self.ids, self.decode = model, ids, decode
        self.max_length = getattr(model.config, "max_sequence_length", None)

    # ------------------------------------------------------------------ public
    def generate(self, requests: list[Request], on_event: Optional[Callable] = None) -> list[Result]:
        """Decode all requests as one batch; events (Tokens, Finished) go to `on_event` as they happen."""
        if not requests:
            return []
        for r in requests:
            r.settings.check()
            if not r.prompt:
                raise ValueError("prompt is empty")
        keys = {shared_key(r.settings) for r in requests}
        if len(keys) > 1:
            raise ValueError(f"requests in one batch must share block_length, cache, cfg_scale, logits_eos_inf, "
                             f"confidence_eos_eot_inf and early_stop; got {sorted(keys)}")
        with torch.inference_mode():
            return _Batch(self, requests, on_event or (lambda e: None)).run()

    @torch.inference_mode()
    def forward(self, x, attn, start: int, use_cache: bool, logits_slice: Optional[slice]):
        return self.model(x, attention_mask=attn, start=start, use_cache=use_cache, logits_slice=logits_slice).logits


class _Batch:
    """State of one batch while it decodes. Rows leave the tensors as they finish (the batch shrinks)."""

    def __init__(self, sampler: Sampler, requests: list[Request], on_event):
        self.s, self.reqs, self.emit = sampler, requests, on_event
        ids, settings = sampler.ids, [r.settings for r in requests]
        first = settings[0]
        self.bl, self.cache, self.cfg = first.block_length, first.cache, first.cfg_scale
        self.eos_inf, self.eos_conf, self.early = first.logits_eos_inf, first.confidence_eos_eot_inf, first.early_stop
        p = next(sampler.model.parameters())
        self.dev = p.device
        self.P = max(len(r.prompt) for r in requests)
        self.G = max(s.gen_length for s in settings)
        L = self.P + self.G
        if sampler.max_length and L > sampler.max_length:
            raise ValueError(f"prompt ({self.P} tokens) + gen_length ({self.G}) = {L} exceeds the model's "
                             f"max_sequence_length {sampler.max_length}")
        pad = ids.pad if ids.pad is not None else ids.eos
        B = len(requests)
        x = torch.full((B, L), pad, dtype=torch.long)
        valid = torch.zeros((B, L), dtype=torch.bool)
        for i, (r, s) in enumerate(zip(requests, settings)):
            x[i, self.P - len(r.prompt):self.P] = torch.tensor(r.prompt, dtype=torch.long)
            x[i, self.P:self.P + s.gen_length] = ids.mask
            valid[i, self.P - len(r.prompt):self.P + s.gen_length] = True
        self.x, self.valid = x.to(self.dev), valid.to(self.dev)
        self.attn = None if bool(valid.all()) else self.valid  # no padding: no mask (SDPA's fast path)
        self.rule = self.rule_tensors(settings)
        self.prompt_cols = torch.zeros((B, L), dtype=torch.bool, device=self.dev)
        for i, r in enumerate(requests):
            self.prompt_cols[i, self.P - len(r.prompt):self.P] = True
        self.rows = list(range(B))  # request index of each tensor row
        self.gens = []
        for s in settings:
            g = torch.Generator(device=self.dev)
            g.manual_seed(s.seed if s.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
            self.gens.append(g)
        self.sched = [block_steps(s.steps, s.gen_length, self.bl) for s in settings]
        self.done_len = [0] * B  # committed contiguous prefix of each row's answer
        self.end: list[Optional[tuple[int, int]]] = [None] * B  # (answer length, stop id) once a stop id is final
        self.stats = [Stats() for _ in requests]
        self.results: list[Optional[Result]] = [None] * B
        self.t0 = time.perf_counter()
        self.stop_ids = [set(ids.stops) | set(s.stop_token_ids) for s in settings]
        self.early_ids = set(ids.stops) if self.early else set()

    def rule_tensors(self, settings: list[SamplerConfig]):
        """Per-row transfer rule as tensors: (threshold, factor, uses threshold, uses factor)."""
        f64 = dict(dtype=torch.float64, device=self.dev)
        return (torch.tensor([st.threshold if st.threshold is not None else 2.0 for st in settings], **f64),
                torch.tensor([st.factor or 0.0 for st in settings], **f64),
                torch.tensor([st.threshold is not None for st in settings], device=self.dev),
                torch.tensor([st.factor is not None for st in settings], device=self.dev))

    # ------------------------------------------------------------------ loop
    def run(self) -> list[Result]:
        nb = -(-self.G // self.bl)
        for b in range(nb):
            if not self.rows:
                break
            s, e = self.P + b * self.bl, min(self.P + (b + 1) * self.bl, self.P + self.G)
            for i in self.rows:
                self.stats[i].blocks += 1
            masks = (self.x[:, s:e] == self.s.ids.mask).sum(-1).tolist()
            plan = {i: quota(m, self.sched[i][b]) if b < len(self.sched[i]) else [] for i, m in zip(self.rows, masks)}
            step = 0
            while self.rows and (self.x[:, s:e] == self.s.ids.mask).any():
                logits = self.step_logits(s, e, step)
                k_quota = torch.tensor([plan[i][step] if step < len(plan[i]) else 0 for i in self.rows],
                                       device=self.dev)
                self.commit(s, e, logits, k_quota)
                step += 1
                self.after_step(s, e)
        for i in list(self.rows):
            self.finish(i, "length")
        if self.cache != "none":
            self.s.model.clear_cache()
        return self.results

    def step_logits(self, s: int, e: int, step: int) -> torch.Tensor:
        """Logits [B, e-s, V] for the current block, by cache mode (reference/sampling.md)."""
        n = e - s
        if self.cache == "none":
            x, start, use_cache, sl = self.x, 0, False, slice(s, e)
        elif step == 0:  # block-start full forward fills the cache for every column
            rows = self.x.shape[0] * (2 if self.cfg > 0 else 1)
            self.s.model.setup_cache(rows, self.x.shape[1])
            x, start, use_cache, sl = self.x, 0, True, slice(s, e)
        elif self.cache == "prefix":  # current block and everything right of it, against cached [0, s)
            x, start, use_cache, sl = self.x[:, s:], s, True, slice(0, n)
        else:  # dual: the block only; its fresh K/V overwrite columns [s, e)
            x, start, use_cache, sl = self.x[:, s:e], s, True, None
        attn = self.attn
        if self.cfg > 0:  # unconditional copy: prompt columns masked; both halves in one forward
            un = torch.where(self.prompt_cols, self.s.ids.mask, self.x)[:, start:start + x.shape[1]]
            x = torch.cat([x, un])
            attn = None if attn is None else torch.cat([attn, attn])
        t = time.perf_counter()
        logits = self.s.forward(x, attn, start, use_cache, sl)
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        dt = time.perf_counter() - t
        for i in self.rows:
            self.stats[i].nfe += 1
            self.stats[i].steps += 1
            self.stats[i].forward_s += dt
        if self.cfg > 0:
            cond, un = logits.chunk(2)
            logits = un + (self.cfg + 1) * (cond - un)
        return logits

    def commit(self, s: int, e: int, logits: torch.Tensor, k_quota: torch.Tensor) -> None:
        """Predict x0 at masked block columns, score confidence, select per row, write. logits: [B, n, V]."""
        ids, xb = self.s.ids, self.x[:, s:e]
        masked = xb == ids.mask  # [B, n]
        logits[..., ids.mask] = -torch.inf  # the mask id is never a prediction (a committed mask would never end)
        if self.eos_inf:
            logits[..., ids.eos] = -torch.inf
        B, n, V = logits.shape
        settings = [self.reqs[i].settings for i in self.rows]
        pred = logits.argmax(-1)  # temperature 0: plain argmax, no draw
        for r, (i, st) in enumerate(zip(self.rows, settings)):
            if st.temperature > 0:  # Gumbel-max in float64: exp(l) / (-log u)^T
                cols = masked[r].nonzero().squeeze(-1)
                u = torch.rand((cols.numel(), V), dtype=torch.float64, device=self.dev, generator=self.gens[i])
                pred[r, cols] = (logits[r, cols].double().exp() / (-torch.log(u)) ** st.temperature).argmax(-1)
        lc = logits[masked].double()  # [M, V]: softmax only where masked
        if self.eos_conf:
            lc[:, list(ids.stops)] = -torch.inf
        conf = torch.full((B, n), -torch.inf, dtype=torch.float64, device=self.dev)
        conf[masked] = torch.softmax(lc, -1).gather(-1, pred[masked][:, None]).squeeze(-1)
        for r, (i, st) in enumerate(zip(self.rows, settings)):
            if st.remasking == "random":
                cols = masked[r].nonzero().squeeze(-1)
                conf[r, cols] = torch.rand(cols.shape, dtype=torch.float64, device=self.dev, generator=self.gens[i])
        m = masked.sum(-1)
        sorted_conf, order = torch.sort(conf, dim=-1, descending=True, stable=True)
        thr, fac, use_thr, use_fac = self.rule
        k_thr = (sorted_conf >= thr[:, None]).sum(-1).clamp(min=1)
        k = torch.where(use_fac, factor_count(sorted_conf, m, fac), torch.where(use_thr, k_thr, k_quota))
        k = torch.minimum(k, m)
        take = torch.arange(n, device=self.dev)[None] < k[:, None]
        select = torch.zeros_like(masked).scatter(-1, order, take)
        self.x[:, s:e] = torch.where(select, pred, xb)
        for i, c in zip(self.rows, k.tolist()):
            self.stats[i].committed += c

    def after_step(self, s: int, e: int) -> None:
        """Emit newly final tokens; finish rows that hit a stop, were aborted, or completed their canvas.

        early_stop governs EOS/EoT only; stop strings and stop ids always end the row at once.
        """
        gen = self.x[:, self.P:].tolist()
        finished = []
        for r, i in enumerate(self.rows):
            req, row, g = self.reqs[i], gen[r], self.reqs[i].settings.gen_length
            old = new = self.done_len[i]
            while new < g and row[new] != self.s.ids.mask:
                new += 1
            self.done_len[i] = new
            if req.aborted:
                finished.append((i, "abort", None, self.end[i][0] if self.end[i] else new))
                continue
            if self.end[i] is None:
                fresh = row[old:new]
                cut = next((j for j, t in enumerate(fresh) if t in self.stop_ids[i]), None)
                if cut is not None:
                    self.end[i] = (old + cut, fresh[cut])
                    fresh = fresh[:cut]
                if fresh:
                    self.emit(Tokens(i, fresh))
                    # the text before a stop id committed in this same step is checked too: with threshold
                    # decoding a whole block (answer, stop string and EoT) often commits in one step
                    hit = self.stop_string(i, row[:old], fresh)
                    if hit is not None:
                        finished.append((i, "stop", *hit))
                        continue
            if self.end[i] is not None:
                end, tok = self.end[i]
                if tok not in self.s.ids.stops or self.early or new == g:
                    finished.append((i, "stop", tok, end))
            elif new == g:
                finished.append((i, "length", None, new))
        for i, reason, stop, end in finished:
            self.finish(i, reason, stop, end)

    def stop_string(self, i: int, before: list[int], fresh: list[int]) -> Optional[tuple[str, int]]:
        """(the earliest stop string in the answer, answer length in tokens) once `fresh` completes one, else None.

        The answer keeps tokens up to the one that completes the stop string (the text is cut before it in
        `finish`), like vLLM. Stop strings were checked at every earlier step, so `before` holds none.
        """
        st = self.reqs[i].settings
        if not st.stop or self.s.decode is None:
            return None
        text = self.s.decode(before + fresh)
        hits = [(text.find(w), w) for w in st.stop if w and w in text]
        if not hits:
            return None
        word = min(hits)[1]
        end = next(k for k in range(len(before) + 1, len(before) + len(fresh) + 1)
                   if word in self.s.decode((before + fresh)[:k]))
        return word, end

    def finish(self, i: int, reason: str, stop=None, end: Optional[int] = None) -> None:
        r = self.rows.index(i)
        row = self.x[r, self.P:self.P + self.reqs[i].settings.gen_length].tolist()
        if end is None:  # end of decoding: a stop id seen earlier, else the whole canvas is the answer
            reason, stop, end = ("stop", self.end[i][1], self.end[i][0]) if self.end[i] else (reason, None, len(row))
        tokens = row[:end]
        text = self.s.decode(tokens) if self.s.decode is not None else None
        if isinstance(stop, str) and text is not None:
            text = text[:text.find(stop)]
        self.stats[i].wall_s = time.perf_counter() - self.t0
        self.results[i] = Result(tokens, text, reason, stop, self.stats[i])
        self.emit(Finished(i, self.results[i]))
        keep = [q for q, j in enumerate(self.rows) if j != i]
        self.rows.pop(r)
        if not self.rows:
            return
        idx = torch.tensor(keep, device=self.dev)
        self.x, self.valid, self.prompt_cols = self.x[idx], self.valid[idx], self.prompt_cols[idx]
        self.attn = None if bool(self.valid.all()) else self.valid
        self.rule = tuple(t[idx] for t in self.rule)
        if self.cache != "none" and self.s.model.transformer.blocks[0].kv_cache is not None:
            n = len(keep) + 1
            cache_rows = torch.cat([idx, idx + n]) if self.cfg > 0 else idx
            self.s.model.select_cache_rows(cache_rows)
