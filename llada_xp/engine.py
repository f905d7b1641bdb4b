"""The batching engine: one worker thread owns the Sampler (and so the model); asyncio callers submit and await.

Rows (one sampler Request per choice) wait in a bounded queue. Two schedulers:
- `continuous` (default): before every step of the sampler's running set, the worker admits waiting rows, oldest
  first, while the set has fewer than max_batch_size rows; a row starts at that step, at its own first block, and
  leaves when it finishes (each row's length is checked against the model alone: nothing else must be shared).
  A joining row needs a whole-canvas forward; it costs no extra forward at a step where a running row starts a
  block (`RunningSet.joins_free`), so rows join at such steps, or once the oldest has waited `join_wait_steps`
  steps with room (0: at the next step, always). `batch_window_s` is not used.
- `static` (the old behaviour, kept for comparison): the worker takes the oldest waiting row and the waiting rows
  that share its `shared_key` (oldest first, up to max_batch_size) and decodes them to the end; rows arriving
  meanwhile wait for the next batch (`batch_window_s` lets a batch gather the rows of clients that come back
  together).
`on_admit(wait_s, mid_batch)` (if given) hears of every admission: the time the row waited, and whether it joined
rows already running.
Events (Tokens, Finished) go back to each caller's event loop with `call_soon_threadsafe`. `Job.cancel()` drops
waiting rows and aborts running ones (the sampler ends them within one step). Knows nothing about HTTP or the
OpenAI format.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from llada_xp.sampler import Finished, Request, Result, RunningSet, Sampler, Stats, Tokens, shared_key

log = logging.getLogger(__name__)

GATHER_MIN_S = 0.002  # a new batch waits this long (within batch_window_s) for rows arriving together ...
GATHER_SHARE = 0.1  # ... but never more than this share of the last batch's time (small models answer in ~ms)


class QueueFull(Exception):
    """The waiting queue has no room; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Failed:
    """Event: the batch holding row `index` raised; `error` is the exception (ValueError = bad settings)."""

    index: int
    error: Exception


@dataclass
class _Row:
    job: "Job"
    index: int  # choice index inside the job
    request: Request
    queued: float = field(default_factory=time.monotonic)
    queued_step: int = 0  # the engine's step count when it was queued (continuous)


@dataclass
class Job:
    """One caller's rows. Events arrive on `events` as (choice index, Tokens | Finished | Failed); Tokens events
    only when `tokens` is set (streaming). `first_token_s` is the perf_counter time of the first final token."""

    requests: list[Request]
    loop: asyncio.AbstractEventLoop
    tokens: bool = True
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    engine: Optional["Engine"] = None
    first_token_s: Optional[float] = None

    def deliver(self, event) -> None:
        """Called on the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the caller's loop is closed (server shutting down)
            pass

    def cancel(self) -> None:
        """Drop this job's waiting rows and abort its running ones (thread-safe, idempotent)."""
        for r in self.requests:
            r.abort()
        if self.engine is not None:
            self.engine._drop(self)


class Engine:
    """Owns a Sampler on one worker thread; forms batches from a bounded queue of rows."""

    def __init__(self, sampler: Sampler, max_batch_size: int = 16, max_queue: int = 256,
                 batch_window_s: float = 0.0, scheduler: str = "continuous",
                 on_admit: Optional[Callable[[float, bool], None]] = None, join_wait_steps: int = 4):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, got {max_batch_size}, {max_queue}")
        if scheduler not in ("continuous", "static"):
            raise ValueError(f"scheduler must be continuous or static, got {scheduler!r}")
        self.sampler, self.max_batch_size, self.max_queue = sampler, max_batch_size, max_queue
        self.batch_window_s, self.scheduler, self.join_wait_steps = batch_window_s, scheduler, join_wait_steps
        self.steps = 0  # continuous: steps of the running set so far
        self.on_admit = on_admit or (lambda wait_s, mid_batch: None)
        self.admitted_mid_batch = 0  # rows that joined rows already running (continuous)
        self._live: dict[int, _Row] = {}  # continuous: running rows by their key in the running set
        self._keys = 0
        self._waiting: deque[_Row] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        self.running = 0  # rows of the current batch (static) or of the running set (continuous) not finished
        self.batches = 0  # static: batches run; continuous: busy periods (the running set went from empty to busy)
        self.last_batch_s = 1.0
        self._last_rows = 1
        self._current: list[_Row] = []

    # ------------------------------------------------------------------ caller side (event loop thread)
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, requests: list[Request], tokens: bool = True) -> Job:
        """Queue the rows of one call; raise QueueFull when they do not fit. Call from a running event loop.

        tokens=False: deliver only Finished (and Failed) events, sparing the event loop one wake-up per step."""
        job = Job(requests, asyncio.get_running_loop(), tokens, engine=self)
        with self._cond:
            if len(requests) > self.max_queue:
                raise ValueError(f"{len(requests)} rows can never fit the queue (max_queue={self.max_queue})")
            self.check_room(len(requests))
            self._waiting.extend(_Row(job, i, r, queued_step=self.steps) for i, r in enumerate(requests))
            self._cond.notify()
        return job

    def check_room(self, rows: int = 1) -> None:
        """Raise QueueFull if `rows` more rows cannot wait now (callers check early and cheaply; submit again)."""
        if self._stopped:
            raise QueueFull("the engine is shutting down", 1)
        if len(self._waiting) + rows > self.max_queue:
            raise QueueFull(f"the server is busy: {len(self._waiting)} rows waiting (max_queue={self.max_queue})",
                            max(1, math.ceil(self.last_batch_s)))

    def _drop(self, job: Job) -> None:
        with self._cond:
            kept = [r for r in self._waiting if r.job is not job]
            if len(kept) != len(self._waiting):
                self._waiting = deque(kept)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._work, name="llada-xp-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything and join the worker."""
        with self._cond:
            self._stopped = True
            dropped = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for row in list(self._current) + list(self._live.copy().values()):  # copy: the worker changes it
            row.request.abort()
        for row in dropped:
            row.request.abort()
            row.job.deliver((row.index, Finished(row.index, _aborted())))
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker thread
    def _next_batch(self) -> Optional[list[_Row]]:
        with self._cond:
            while not self._waiting and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            # Gather: clients of the last batch tend to come back together, so wait (at most batch_window_s) until
            # as many rows wait as that batch had; and always a short floor (GATHER_MIN_S, at most GATHER_SHARE of the
            # last batch's time), for bursts that arrive together.
            target = min(self.max_batch_size, max(1, self._last_rows))
            start = time.monotonic()
            deadline = start + self.batch_window_s
            floor = start + min(GATHER_MIN_S, GATHER_SHARE * self.last_batch_s, self.batch_window_s)
            while not self._stopped and len(self._waiting) < self.max_batch_size:
                t = time.monotonic()
                if t >= deadline or (len(self._waiting) >= target and t >= floor):
                    break
                self._cond.wait((floor if len(self._waiting) >= target else deadline) - t)
            if not self._waiting:
                return []
            key = shared_key(self._waiting[0].request.settings)
            batch, rest, P, G = [], deque(), 0, 0
            limit = self.sampler.max_length or math.inf
            for row in self._waiting:
                p, g = max(P, len(row.request.prompt)), max(G, row.request.settings.gen_length)
                # the batch canvas is the longest prompt + the longest answer: it must fit the model
                if len(batch) < self.max_batch_size and shared_key(row.request.settings) == key \
                        and (not batch or p + g <= limit):
                    batch.append(row)
                    P, G = p, g
                else:
                    rest.append(row)
            self._waiting = rest
            self._current = batch
            self.running = self._last_rows = len(batch)
            now = time.monotonic()
            for row in batch:
                self.on_admit(now - row.queued, False)
            return batch

    def _work(self) -> None:
        if self.scheduler == "continuous":
            return self._work_continuous()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            t = time.perf_counter()
            log.debug("batch of %d rows (%d waiting)", len(batch), len(self._waiting))
            try:
                self.sampler.generate([r.request for r in batch], on_event=lambda e: self._route(batch, e))
            except Exception as e:  # a bad row must not stop the worker; its callers get the error
                if isinstance(e, ValueError):
                    log.info("batch of %d rows refused: %s", len(batch), e)
                else:
                    log.exception("batch of %d rows failed", len(batch))
                for r in batch:
                    r.job.deliver((r.index, Failed(r.index, e)))
            finally:
                self._current = []
                self.running = 0
                self.batches += 1
                self.last_batch_s = time.perf_counter() - t

    def _route(self, batch: list[_Row], event) -> None:
        row = batch[event.index]
        if isinstance(event, Finished):
            self.running -= 1
        elif row.job.first_token_s is None:
            row.job.first_token_s = time.perf_counter()
        if row.job.tokens or not isinstance(event, Tokens):
            row.job.deliver((row.index, event))

    # ------------------------------------------------------------------ worker thread, continuous
    def _work_continuous(self) -> None:
        rs: Optional[RunningSet] = None
        while True:
            with self._cond:
                while not self._waiting and not rs and not self._stopped:
                    self._cond.wait()
                if self._stopped and not rs:
                    return
                if not rs:  # a fresh set for each busy period
                    rs = self.sampler.running(self._route_live)
                    self.batches += int(bool(self._waiting))
                refused = self._admit(rs)
            for row, e in refused:
                log.info("row refused: %s", e)
                row.job.deliver((row.index, Failed(row.index, e)))
            if not rs:
                continue
            try:
                rs.step()
                self.steps += 1
            except Exception as e:  # the running rows' callers get the error; the worker goes on
                log.exception("a step of %d running rows failed", len(self._live))
                for row in self._live.values():
                    row.job.deliver((row.index, Failed(row.index, e)))
                self._live.clear()
                rs.close()
                rs = None
            self.running = len(self._live)

    def _admit(self, rs: RunningSet) -> list[tuple[_Row, Exception]]:
        """Move waiting rows into the running set, oldest first, up to max_batch_size (under the lock)."""
        refused, mid = [], bool(rs)
        now = time.monotonic()
        if self._waiting and not rs.joins_free and self.steps - self._waiting[0].queued_step < self.join_wait_steps:
            return refused  # joining now would cost a forward of its own; the next block start is near
        while self._waiting and len(rs) < self.max_batch_size:
            row = self._waiting.popleft()
            key, self._keys = self._keys, self._keys + 1
            try:
                rs.add(row.request, key)
            except ValueError as e:  # bad settings or too long for the model: this row only
                refused.append((row, e))
                continue
            self._live[key] = row
            self.admitted_mid_batch += mid
            self.on_admit(now - row.queued, mid)
        self.running = len(self._live)
        return refused

    def _route_live(self, event) -> None:
        row = self._live[event.index]
        if isinstance(event, Finished):
            del self._live[event.index]
            self.running = len(self._live)
            self.last_batch_s = max(event.result.stats.wall_s, 0.001)
        elif row.job.first_token_s is None:
            row.job.first_token_s = time.perf_counter()
        if row.job.tokens or not isinstance(event, Tokens):
            row.job.deliver((row.index, Finished(row.index, event.result) if isinstance(event, Finished)
                             else Tokens(row.index, event.tokens)))


def _aborted() -> Result:
    return Result([], "", "abort", None, Stats())
