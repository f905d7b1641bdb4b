"""The lm-evaluation-harness adapter: our loaded model as an lm-eval `LM`, and `run_tasks` behind `task=lm_eval`.

`generate_until` turns lm-eval requests into sampler Requests (batched through `Sampler.generate`, never a second
decoding loop); `loglikelihood` goes to the Monte-Carlo ELBO of `likelihood.py` (task.mc_num,
mc_batch_size, cfg_scale, mc_seed); `loglikelihood_rolling` (perplexity tasks) is refused, naming the task. The only module that imports
`lm_eval`. Knows nothing about Hydra, W&B or output files (evaluate.py writes and logs what `run_tasks` returns).

Shards (num_shards > 1): shard k evaluates documents k, k + n, k + 2n, ... of every task (lm-eval's `samples=`),
with exactly the prompts and seeds of the unsharded run; `merge_results` recomputes the metrics from the union of
the shards' sample records with lm-eval's own aggregation (`run_tasks`, `merge_results`).

Generation kwargs of a request (the task's `generation_kwargs`, overridden by task.gen_kwargs) map to SamplerConfig:
- `until` (a string or a list) → stop strings, added to the sampler's; the answer is cut before the first one.
- `max_gen_toks` → gen_length (logged as a warning when it differs from sampler.gen_length); `steps` scales with it
  (the configured steps per token are kept) unless the request sets `steps` itself.
- `do_sample: false` → temperature 0 (argmax, no random draw), whatever `temperature` says (as in lm-eval's HF
  model); `do_sample: true` → the request's `temperature`, else the sampler's, which must then be > 0;
  `temperature` alone → that temperature.
- Every SamplerConfig field by its own name (steps, block_length, threshold, factor, cfg_scale, remasking, cache,
  seed, gen_length, logits_eos_inf, confidence_eos_eot_inf, early_stop, stop, stop_token_ids).
- Neutral values of settings we do not have are accepted (top_p 1, top_k 0/null, num_beams 1, repetition_penalty 1);
  any other key or value is refused with an error naming it (never silently dropped).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

from llada_xp.config import EvalConfig, SamplerConfig
from llada_xp.sampler import Request, Sampler, SpecialIds

log = logging.getLogger(__name__)

SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(SamplerConfig))
# Settings the sampler does not have, with the values that mean "off" (accepted: they ask for nothing)
NEUTRAL = {"top_p": (1, 1.0, None), "top_k": (0, None, -1), "num_beams": (1, None), "repetition_penalty": (1, 1.0, None),
           "min_p": (0, 0.0, None)}
BOOTSTRAP_ITERS = 1000  # lm-eval's bootstrap resamples for the stderr of non-mean metrics (bleu, f1, ...)


class LmEvalError(ValueError):
    """An lm-eval request or task we cannot serve as asked; the message names the key or the task."""


def sampler_settings(base: SamplerConfig, gen_kwargs: dict[str, Any]) -> SamplerConfig:
    """The sampler settings for one request: `base` (the eval's sampler config) with the request's gen kwargs."""
    kw = dict(gen_kwargs or {})
    s = dataclasses.replace(base, stop=list(base.stop), stop_token_ids=list(base.stop_token_ids))
    until = kw.pop("until", None)
    if until is not None:
        s.stop += [until] if isinstance(until, str) else list(until)
    do_sample = kw.pop("do_sample", None)
    temperature = kw.pop("temperature", None)
    max_gen_toks = kw.pop("max_gen_toks", None)
    for key in list(kw):
        if key in NEUTRAL:
            if kw[key] not in NEUTRAL[key]:
                raise LmEvalError(f"generation kwarg {key}={kw[key]!r} is not supported by the diffusion sampler "
                                  f"(only the neutral value {NEUTRAL[key][0]!r} is accepted)")
            kw.pop(key)
    unknown = sorted(k for k in kw if k not in SAMPLER_FIELDS)
    if unknown:
        raise LmEvalError(f"generation kwarg {unknown[0]!r} is not supported (the sampler takes until, max_gen_toks, "
                          f"do_sample, temperature and its own fields: {', '.join(SAMPLER_FIELDS)})")
    if max_gen_toks is not None and "gen_length" not in kw:
        if "steps" not in kw:  # keep the configured steps per token
            kw["steps"] = max(1, round(s.steps * int(max_gen_toks) / s.gen_length))
        kw["gen_length"] = int(max_gen_toks)
    if "stop" in kw:
        s.stop += [kw.pop("stop")] if isinstance(kw["stop"], str) else list(kw.pop("stop"))
    s = dataclasses.replace(s, **kw)
    if do_sample is False:
        s.temperature = 0.0
    elif temperature is not None:
        s.temperature = float(temperature)
    if do_sample is True and s.temperature == 0:
        raise LmEvalError("generation kwarg do_sample=true needs temperature > 0 (in the request or sampler.temperature)")
    try:
        s.check()
    except ValueError as e:
        raise LmEvalError(f"generation kwargs {gen_kwargs}: {e}") from None
    return s


class LladaLM(LM):
    """A loaded LLaDA model (loading.py) as an lm-eval LM. `records` collects one dict per generation request (the
    sampler's stats: nfe, tokens, committed, latency, batch) for the speed figures evaluate.py reports.

    `positions` (filled by `run_tasks`): id(Instance) -> (its first copy's place in the whole evaluation's list of
    requests of its type, its document) — what a request's seed and record use, so that they do not depend on the
    shard or on how many requests a resume still has to answer."""

    def __init__(self, model, tokenizer, ids: SpecialIds, sampler: SamplerConfig, batch_size: int = 16,
                 elbo: Any = None, threads: Optional[int] = None, progress: Optional[Callable[[int], None]] = None,
                 check_greedy: bool = False, feed: str = "continuous"):
        super().__init__()
        self.model, self.tokenizer, self.ids = model, tokenizer, ids
        self.sampler_cfg, self.batch_size, self.elbo, self.threads = sampler, batch_size, elbo, threads
        self.check_greedy, self.feed = check_greedy, feed
        self.sampler = Sampler(model, ids, decode=tokenizer.decode)
        self.records: list[dict] = []  # one per generation request
        self.positions: dict[int, tuple[int, int]] = {}
        self.likelihood = dict(loglikelihood_requests=0, loglikelihood_s=0.0, loglikelihood_forwards=0)
        self.progress = progress or (lambda n: None)

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt: the tokenizer's own special tokens (BOS) unless the text already starts with
        them (a chat template renders its BOS into the text)."""
        ids = list(self.tokenizer(text)["input_ids"])
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise LmEvalError("task.apply_chat_template=true but the tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """The requests sorted by prompt length (as evaluate.py orders examples) through `Sampler.feed`: at most
        `batch_size` decode together, refilled as they finish (`feed`=continuous; per-request settings such as a
        task's own max_gen_toks or until strings may differ within the running set) or batch after batch
        (static). When sampler.seed is set, the request at place i of the whole evaluation's
        generation requests (`positions`; else of this call) draws from seed + i."""
        settings, places, docs, copies = [], [], [], defaultdict(int)
        for i, r in enumerate(requests):
            gen_kwargs = r.args[1] if len(r.args) > 1 else {}
            try:
                s = sampler_settings(self.sampler_cfg, gen_kwargs)
            except LmEvalError as e:
                raise LmEvalError(f"task {r.task_name}: {e}") from None
            first, doc = self.positions.get(id(r), (i, r.doc_id))
            place = first + copies[id(r)] if id(r) in self.positions else i  # lm-eval repeats a request as copies
            copies[id(r)] += 1
            places.append(place)
            docs.append(doc)
            settings.append(dataclasses.replace(s, seed=None if s.seed is None else s.seed + place))
        overridden = {(r.task_name, s.gen_length) for r, s in zip(requests, settings)
                      if s.gen_length != self.sampler_cfg.gen_length}
        for task, gen_length in sorted(overridden, key=str):
            log.warning("task %s: its max_gen_toks / gen_length sets the generation length to %d tokens, not "
                        "sampler.gen_length=%d (task.gen_kwargs={max_gen_toks: N} chooses it)", task, gen_length,
                        self.sampler_cfg.gen_length)
        prompts = [self.encode(r.args[0]) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: (len(prompts[i]), i))
        batches = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        out: list[Optional[str]] = [None] * len(requests)

        def finished(i, res, run_id, run_s, run_forwards):
            out[i] = res.text  # decoded and cut at the stop string by the sampler
            self.cache_hook.add_partial("generate_until", requests[i].args, out[i])  # resume: kept at once
            st = res.stats
            self.records.append(dict(request=places[i], task=requests[i].task_name, doc_id=docs[i],
                                     token_ids=res.tokens, nfe=st.nfe, tokens=len(res.tokens),
                                     committed=st.committed, finish_reason=res.finish_reason, latency_s=st.wall_s,
                                     forward_s=st.forward_s, batch=run_id, run_s=run_s, run_forwards=run_forwards,
                                     threads=self.threads))
            self.progress(1)

        self.sampler.feed({i: Request(prompts[i], settings[i]) for i in order}, batches, self.batch_size, self.feed,
                          finished)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ likelihood
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's rule (reference/likelihood.md): the context's trailing whitespace moves to the continuation;
        the continuation's ids are those of the whole string after the context's ids."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """The Monte-Carlo ELBO of each (context, continuation) (likelihood.py, seeded: reproducible), and whether
        the continuation is the greedy decode — False unless check_greedy (as LLaDA's is_check_greedy; no metric of
        the paper needs it)."""
        from llada_xp.likelihood import ELBO, is_greedy, log_likelihood

        settings = self.elbo if self.elbo is not None else ELBO()
        started, out = time.perf_counter(), []
        for r in requests:
            prompt, answer = self.encode_pair(*r.args[:2])
            if not answer:
                raise LmEvalError(f"task {r.task_name}: an empty continuation after {r.args[0][-40:]!r}")
            ll = log_likelihood(self.model, self.ids, prompt, answer, settings)
            greedy = bool(self.check_greedy and is_greedy(self.model, self.ids, prompt, answer, settings.cfg_scale))
            out.append((ll, greedy))
            self.cache_hook.add_partial("loglikelihood", r.args, (ll, greedy))
            self.progress(1)
        self.likelihood = dict(loglikelihood_requests=self.likelihood["loglikelihood_requests"] + len(requests),
                               loglikelihood_s=self.likelihood["loglikelihood_s"] + time.perf_counter() - started,
                               loglikelihood_forwards=self.likelihood["loglikelihood_forwards"]
                               + len(requests) * settings.mc_num // settings.batch_size)
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        name = requests[0].task_name if requests else "?"
        raise LmEvalError(f"task {name} needs loglikelihood_rolling (perplexity of whole documents), which a masked "
                          f"diffusion model does not give: its ELBO is defined for a continuation of a prompt")


# --------------------------------------------------------------------------------------------------- tasks
def run_tasks(cfg: EvalConfig, loaded, progress: Optional[Callable[[int], None]] = None,
              cache: Optional[str] = None) -> tuple[dict, list[dict], LladaLM]:
    """Evaluate cfg.task.tasks with lm-eval through our model (this shard's documents of each task: `shard_documents`).
    Returns (metrics, sample records, the LM).

    cache: lm-eval's request cache (an SQLite file per path, `_rank0.db` appended): every answered request is stored
    the moment it is answered, and a rerun answers from it — how task=lm_eval resumes. lm-eval never caches
    requests with do_sample=true; those run again.

    metrics: every number lm-eval reports over this shard's documents, keyed `TASK/METRIC/FILTER` (stderr as
    `TASK/METRIC_stderr/FILTER`), plus `lm_eval` (lm-eval's versions, n-shot and sample counts per task, and
    `documents`: each task's documents in the whole evaluation, all shards together)."""
    import lm_eval

    from llada_xp.likelihood import ELBO

    t = cfg.task
    elbo = ELBO(mc_num=t.mc_num, batch_size=t.mc_batch_size, cfg_scale=t.cfg_scale, seed=t.mc_seed)
    lm = LladaLM(loaded.model, loaded.tokenizer, loaded.info.ids, cfg.sampler, cfg.batch_size, elbo=elbo,
                 threads=loaded.info.threads, progress=progress, check_greedy=t.check_greedy, feed=cfg.feed)
    manager = _task_manager(t.include_path, t.tasks)
    started = time.perf_counter()
    try:
        objects, samples, documents = _load_tasks(manager, t.tasks, lm, t.limit, cfg.shard_index, cfg.num_shards)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=objects, num_fewshot=t.num_fewshot, limit=None if samples else t.limit, samples=samples,
            task_manager=manager, apply_chat_template=t.apply_chat_template,
            fewshot_as_multiturn=t.fewshot_as_multiturn, system_instruction=t.system_instruction,
            gen_kwargs=dict(t.gen_kwargs) or None, confirm_run_unsafe_code=t.confirm_run_unsafe_code,
            log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS, use_cache=cache)
    except ConnectionError as e:  # HF_DATASETS_OFFLINE=1 and a dataset not cached
        raise _offline(t.tasks, e) from None
    metrics = _metrics(results)
    metrics["lm_eval"] = dict(version=results.get("versions"), n_shot=results.get("n-shot"),
                              n_samples=results.get("n-samples"), documents=documents,
                              seconds=time.perf_counter() - started)
    records = [_record(task, s) for task, logged in results.get("samples", {}).items() for s in logged]
    return metrics, records, lm


def _offline(tasks: list[str], e: Exception) -> LmEvalError:
    return LmEvalError(f"lm-eval tasks {list(tasks)}: a dataset is not available offline ({e}); "
                       f"run once with network access to cache it, or unset HF_DATASETS_OFFLINE")


def _metrics(results: dict) -> dict[str, Any]:
    """lm-eval's results as `TASK/METRIC/FILTER` -> number (strings such as stderr "N/A" left out)."""
    metrics: dict[str, Any] = {}
    for task, res in results["results"].items():
        for key, value in res.items():
            if key == "alias" or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{task}/{metric}/{filt}"] = value
    return metrics


# --------------------------------------------------------------------------------------------------- shards
def shard_documents(n: int, shard_index: int, num_shards: int) -> list[int]:
    """A shard's documents of a task with n documents: every num_shards-th from shard_index, ascending (lm-eval's
    `samples=` numbers the k-th document it evaluates by the k-th index: they must be sorted)."""
    return list(range(shard_index, n, num_shards))


def _load_tasks(manager, names: list[str], lm: LladaLM, limit: Optional[int], shard_index: int,
                num_shards: int) -> tuple[list, Optional[dict[str, list[int]]], dict[str, int]]:
    """The lm-eval tasks and groups named, loaded for simple_evaluate, each task's request building wrapped
    (`_keep_shard`). Returns (the tasks and groups, `samples=` for simple_evaluate — None unsharded — and each task's
    documents in the whole evaluation: its first `limit`)."""
    objects: list = []
    samples: dict[str, list[int]] = {}
    documents: dict[str, int] = {}
    counts: dict[str, int] = defaultdict(int)  # requests of each type so far, in lm-eval's order
    for name in names:  # one by one: the objects keep the order of the names (and so the requests theirs)
        one = manager.load(name)
        inner = {id(child) for g in one["groups"].values() for child in g}
        objects += [o for o in [*one["groups"].values(), *one["tasks"].values()] if id(o) not in inner]
        for task_name, task in one["tasks"].items():
            n = len(task.eval_docs) if limit is None else min(limit, len(task.eval_docs))
            samples[task_name] = mine = shard_documents(n, shard_index, num_shards)
            if not mine:
                raise LmEvalError(f"task {task_name} has {n} documents, fewer than num_shards={num_shards}: shard "
                                  f"{shard_index} would have none (use fewer shards)")
            documents[task_name] = n
            _keep_shard(task, n, mine, lm.positions, counts)
    return objects, (samples if num_shards > 1 else None), documents


def _keep_shard(task, n: int, mine: list[int], positions: dict, counts: dict[str, int]) -> None:
    """Make `task` build the requests of all its n documents, as an unsharded run does — lm-eval draws a task's
    few-shot examples document after document from one generator, so a shard that built only its own documents would
    give them other examples — and keep those of the documents `mine`, numbered 0, 1, ... as lm-eval's `samples=`
    numbers them. `positions` gets each kept request's place among all requests of its type (`LladaLM.positions`).
    lm-eval calls the wrapped method with samples=mine and limit=None (sharded) or the limit: both are replaced."""
    build = task.build_all_requests
    keep = {doc: k for k, doc in enumerate(mine)}

    def build_all_requests(**kw):
        build(**dict(kw, limit=n, samples=None))
        kept = []
        for inst in task.instances:
            first = counts[inst.request_type]
            counts[inst.request_type] += inst.repeats  # lm-eval sends `repeats` copies of each request
            if inst.doc_id in keep:
                positions[id(inst)] = (first, inst.doc_id)
                inst.doc_id = keep[inst.doc_id]
                kept.append(inst)
        task._instances = kept

    task.build_all_requests = build_all_requests


def merge_results(tasks: list[str], include_path: Optional[str], records: list[dict]) -> dict[str, Any]:
    """The metrics of a sharded evaluation from the union of its shards' sample records, given in the unsharded run's
    order (task, filter, document): each task's per-document metric values go through lm-eval's own aggregation —
    the task's aggregation() (the mean for acc and exact_match; corpus-level for bleu, f1, mcc, ...), its stderr
    (closed form or bootstrap) and the group scores — the code the unsharded run's numbers come from, so they are
    equal. A metric a shard could not store exactly (`inexact` in its records) is left out, with every group score
    built on it, and named with the reason in `lm_eval.not_merged`. Loads the tasks (their datasets: cached offline)."""
    from lm_eval.evaluator_utils import _process_results  # what lm-eval's evaluate() aggregates with (0.4.13)

    try:
        loaded = _task_manager(include_path, tasks).load(list(tasks))
    except ConnectionError as e:
        raise _offline(tasks, e) from None
    not_merged = {f"{r['task']}/{m}/{r['filter']}": "a shard could not store its values per document exactly"
                  for r in records for m in r.get("inexact", [])}
    acc = {name: dict(task=task, raw_metrics=defaultdict(list), logged_samples=[])
           for name, task in loaded["tasks"].items()}
    for r in records:
        if r["task"] not in acc:
            raise LmEvalError(f"the samples hold task {r['task']}, which {list(tasks)} does not load")
        for metric, value in r["metrics"].items():
            if f"{r['task']}/{metric}/{r['filter']}" not in not_merged:
                acc[r["task"]]["raw_metrics"][(metric, r["filter"])].append(value)
    try:
        results = _process_results(acc, loaded["groups"], BOOTSTRAP_ITERS)._to_eval_results()
    except Exception as e:  # a task's own aggregation function: anything
        raise LmEvalError(f"lm-eval could not aggregate the shards' samples of {list(tasks)}: "
                          f"{type(e).__name__}: {e}") from e
    for g in loaded["groups"].values():  # a group score of a metric not merged would be made of the other subtasks
        leaves = {t.task_name for t in g.get_all_tasks()}
        for key in [k for k in not_merged if k.split("/")[0] in leaves]:
            _, metric, filt = key.split("/")
            not_merged[f"{g.name}/{metric}/{filt}"] = f"built on {key}, not merged"
    left_out = set(not_merged) | {"{}/{}_stderr/{}".format(*k.split("/")) for k in not_merged}
    metrics = {k: v for k, v in _metrics(results).items() if k not in left_out}
    metrics["lm_eval"] = dict(version=results.get("versions"), n_shot=results.get("n-shot"),
                              n_samples=results.get("n-samples"), not_merged=not_merged)
    return metrics


def _task_manager(include_path: Optional[str], names: list[str]):
    """lm-eval's TaskManager; only include_path's YAMLs when they hold every task named (indexing lm-eval's own
    thousands of task YAMLs takes ~20 s). An unknown task name is an error naming it."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise LmEvalError(f"task.include_path={include_path!r} is not a folder")
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in set(manager.all_tasks) for n in names):
            return manager
    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    missing = [n for n in names if n not in known]
    if missing:
        import difflib

        near = {n: difflib.get_close_matches(n, known, n=1) for n in missing}
        hints = "; ".join(f"{n}: did you mean {near[n][0]}?" for n in missing if near[n])
        raise LmEvalError(f"unknown lm-eval task {', '.join(missing)} (task.include_path adds a folder of task "
                          f"YAMLs){'; ' + hints if hints else ''}")
    return manager


def _record(task: str, s: dict) -> dict:
    """One samples.jsonl line of an lm-eval sample: prompt, output, target and its metrics — the values lm-eval
    aggregates, as JSON that reads back to the same numbers (`_plain`; `merge_results` aggregates them again). A
    value without such a form is written as its repr and its metric named in `inexact` (not merged over shards)."""
    args = s.get("arguments") or []
    prompt = args[0][0] if args and args[0] else None
    outputs = s.get("filtered_resps")
    if isinstance(outputs, list) and len(outputs) == 1:
        outputs = outputs[0]
    metrics, inexact = {}, []
    for m in s.get("metrics", []):
        try:
            metrics[m] = _plain(s.get(m))
        except TypeError:
            metrics[m] = repr(s.get(m))
            inexact.append(m)
    record = dict(task=task, index=s.get("doc_id"), filter=s.get("filter"), prompt=prompt, output=outputs,
                  target=s.get("target"), metrics=metrics)
    if inexact:
        record["inexact"] = inexact
    return record


def _plain(v: Any) -> Any:
    """v as JSON data that reads back to a value lm-eval's aggregation computes the same with: numpy float64 is a
    Python float already, numpy ints and bools become Python's, tuples lists. TypeError for anything else (a numpy
    float32 would be summed in float64 after the round trip; objects have no JSON form)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.generic) and v.dtype.kind in "biu":
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: _plain(x) for k, x in v.items()}
    raise TypeError(f"{type(v).__name__} has no exact JSON form")
