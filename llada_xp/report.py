"""Sweep reports: every point of a multirun in one table (report.csv, report.md) and an accuracy-vs-tokens/s plot
with the Pareto front marked (quality_vs_speed.png), all in the sweep dir and logged to the sweep's W&B group.

Points that failed (eval.py wrote failed.json in their dir) are listed with their error and log file, and make the
sweep's exit status 1. Points that are shards of one evaluation (same settings, shard_index swept) are one point of
the report, their merged result (task=lm_eval: a metric that cannot be merged exactly is named, not given a
number); an evaluation with a shard missing is listed as failed, not plotted. Runs by itself
after a multirun (`ReportCallback`, configured in conf/eval.yaml) or by hand:
    python -m llada_xp.report SWEEP_DIR [--no-wandb]
Reads only output dirs (metrics.json, failed.json, .hydra/overrides.yaml; shards' samples.jsonl to merge them, and
for task=lm_eval lm-eval's task definitions, whose aggregation the merge uses); knows nothing about models or sampling.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

CSV, MARKDOWN, PLOT = "report.csv", "report.md", "quality_vs_speed.png"
FAILED = "failed.json"  # written by eval.py into the output dir of a sweep point that failed
# metrics.json keys shown per point, with their format (threads: torch CPU threads the speed was measured with)
METRICS = {"accuracy": "{:.3f}", "tokens_per_s": "{:.1f}", "nfe_mean": "{:.1f}", "tokens_per_forward_total": "{:.2f}",
           "latency_p50_s": "{:.3f}", "n": "{}", "threads": "{}"}
NO_PLOT = "no point of the sweep finished"
TASK_METRIC = "{:.4f}"  # task=lm_eval's TASK/METRIC/FILTER values (every filter a column: strict-match, flexible-extract)  # why a report has no plot


class ReportError(RuntimeError):
    """No report can be made from the given dir; the message says why."""


@dataclass
class Point:
    dir: Path  # the job's output dir, relative to the sweep dir
    overrides: dict[str, str]  # the job's command-line / sweeper overrides (key -> value)
    metrics: dict[str, Any]  # metrics.json
    pareto: bool = False
    params: dict[str, str] = field(default_factory=dict)  # the swept overrides only


@dataclass
class Failure:
    dir: Path  # the job's output dir, relative to the sweep dir
    overrides: dict[str, str]
    error: str
    log: str  # the point's log file
    logger: dict = field(default_factory=dict)  # the point's logger config (where the report logs to)


@dataclass
class Report:
    points: list[Point]
    swept: list[str]
    csv: Path
    markdown: Path
    plot: Optional[Path]  # None when no point finished (NO_PLOT)
    table: str  # the Markdown table (and the failed points)
    failed: list[Failure] = field(default_factory=list)


def _job_order(d: Path) -> list:
    d = Path(str(d).split("+")[0])  # merged shards "0+1": where their first shard is
    return [(0, int(s)) if s.isdigit() else (1, s) for s in d.parts]


def _overrides(d: Path) -> dict[str, str]:
    ov = d / ".hydra" / "overrides.yaml"
    return dict(_split(o) for o in _read_overrides(ov)) if ov.exists() else {}


def collect(sweep_dir: Path) -> list[Point]:
    """Every finished point under `sweep_dir` (dirs with a metrics.json), in job order."""
    points = [Point(m.parent.relative_to(sweep_dir), _overrides(m.parent), json.loads(m.read_text()))
              for m in sweep_dir.rglob("metrics.json")]
    return sorted(points, key=lambda p: _job_order(p.dir))


def collect_failed(sweep_dir: Path) -> list[Failure]:
    """Every point that failed (a failed.json and no metrics.json), in job order."""
    out = []
    for f in sweep_dir.rglob(FAILED):
        if (f.parent / "metrics.json").exists():  # failed once, finished when run again
            continue
        info = json.loads(f.read_text())
        out.append(Failure(f.parent.relative_to(sweep_dir), _overrides(f.parent), info.get("error", "?"),
                           info.get("log", ""), info.get("logger") or {}))
    return sorted(out, key=lambda p: _job_order(p.dir))


def merge_shards(points: list[Point], sweep_dir: Path) -> tuple[list[Point], list[Failure]]:
    """Shards of one evaluation (same settings apart from shard_index) → one point of their merged result, named
    "0+1+…"; an evaluation with a shard missing or unfinished → a failure (part of a task is not a result to plot).
    A merged dir of the same evaluation (evaluate merge --out inside the sweep dir) is then left out: it is the same."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        if p.metrics.get("shard", {}).get("num_shards", 1) > 1:
            settings = tuple(sorted((k, v) for k, v in p.overrides.items() if k != "shard_index"))
            groups.setdefault((p.metrics["key"], settings), []).append(p)
    if not groups:
        return points, []
    from llada_xp.evaluate import EvalError, join

    shards, keys = {id(p) for g in groups.values() for p in g}, {k for k, _ in groups}

    def kept(p: Point) -> bool:  # neither a shard nor a merge of shards that are here
        return id(p) not in shards and not (p.metrics.get("merged_from") and p.metrics.get("key") in keys)

    out, failed = [p for p in points if kept(p)], []
    for g in groups.values():
        name = Path("+".join(str(p.dir) for p in g))
        overrides = {k: v for k, v in g[0].overrides.items() if k != "shard_index"}
        try:
            out.append(Point(name, overrides, join([sweep_dir / p.dir for p in g])[1]))
        except EvalError as e:
            failed.append(Failure(name, overrides, f"sharded evaluation not plotted: {e}", ""))
    return sorted(out, key=lambda p: _job_order(p.dir)), failed


def _read_overrides(path: Path) -> list[str]:
    import yaml

    return [str(o) for o in yaml.safe_load(path.read_text()) or []]


def _split(override: str) -> tuple[str, str]:
    k, _, v = override.partition("=")
    return k.lstrip("+~"), v


def typed_overrides(overrides: list[str]) -> dict[str, Any]:
    """Override strings → {key: the value as Hydra reads it} (0.7 a float, 12 an int, null None, [a] a list)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(list(overrides))}


def swept_keys(points: list) -> list[str]:
    """Overrides whose value differs between points (in first-seen order)."""
    keys: list[str] = []
    for p in points:
        keys += [k for k in p.overrides if k not in keys]
    return [k for k in keys if len({p.overrides.get(k) for p in points}) > 1]


def _speed(p: Point) -> float:
    return p.metrics.get("tokens_per_s") or 0.0  # none: an lm-eval sweep of likelihood tasks only


def mark_pareto(points: list[Point]) -> None:
    """A point is on the front when no other point is at least as accurate and as fast, and better in one."""
    for p in points:
        a, s = p.metrics["accuracy"], _speed(p)
        p.pareto = not any(q.metrics["accuracy"] >= a and _speed(q) >= s
                           and (q.metrics["accuracy"] > a or _speed(q) > s) for q in points)


def columns(points: list) -> dict[str, str]:
    """The metrics.json keys shown, with their format: METRICS, then every lm-eval TASK/METRIC/FILTER of any point."""
    tasks = sorted({k for p in points for k in p.metrics if "/" in k and "_stderr/" not in k})
    return {**METRICS, **{k: TASK_METRIC for k in tasks}}


def rows(points: list[Point], swept: list[str]) -> tuple[list[str], list[list[str]]]:
    cols = columns(points)
    header = ["point", *swept, *cols, "pareto"]
    body = [[str(p.dir), *(p.overrides.get(k, "") for k in swept),
             *("" if p.metrics.get(k) is None else fmt.format(p.metrics[k]) for k, fmt in cols.items()),
             "yes" if p.pareto else ""] for p in points]
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body]) + "\n"


def label(p: Point) -> str:
    return ", ".join(f"{k.removeprefix('sampler.')}={v}" for k, v in p.params.items()) or str(p.dir)


def nearby(points: list[Point], xs: list[float], ys: list[float], near: float = 0.1) -> list[list[Point]]:
    """Points grouped with the first earlier point that lies within `near` of the axes' spans in both directions."""
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    groups: list[tuple[float, float, list[Point]]] = []
    for p, x, y in zip(points, xs, ys):
        for gx, gy, g in groups:
            if abs(x - gx) <= near * span_x and abs(y - gy) <= near * span_y:
                g.append(p)
                break
        else:
            groups.append((x, y, [p]))
    return [g for _, _, g in groups]


def plot(points: list[Point], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [_speed(p) for p in points]
    ys = [p.metrics["accuracy"] for p in points]
    ax.scatter(xs, ys, color="tab:gray", zorder=2, label="sweep point")
    front = sorted((p for p in points if p.pareto), key=_speed)
    ax.plot([_speed(p) for p in front], [p.metrics["accuracy"] for p in front], "o-",
            color="tab:red", zorder=3, label="Pareto front")
    mid = (min(xs) + max(xs)) / 2
    for k, group in enumerate(nearby(points, xs, ys)):  # one stacked label per cluster; alternate above / below
        x, y = _speed(group[0]), group[0].metrics["accuracy"]
        right = x > mid  # labels of points in the right half extend to the left, inside the axes
        ax.annotate("\n".join(label(p) for p in group), (x, y), textcoords="offset points",
                    xytext=(-4 if right else 4, 5 if k % 2 == 0 else -5), ha="right" if right else "left",
                    va="bottom" if k % 2 == 0 else "top", fontsize=7)
    ax.set_xlabel("tokens / s")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(sweep_dir: Path, log_wandb: bool = True) -> Report:
    """Write the table and the plot for the sweep in `sweep_dir`; log them to W&B if the points used logger=wandb."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ReportError(f"sweep dir not found: {sweep_dir}")
    points, failed = collect(sweep_dir), collect_failed(sweep_dir)
    if not points and not failed:
        raise ReportError(f"no metrics.json under {sweep_dir}: no point of the sweep finished")
    points, unmerged = merge_shards(points, sweep_dir)
    failed = sorted(failed + unmerged, key=lambda p: _job_order(p.dir))
    swept = swept_keys(points + failed)
    for p in points:
        p.params = {k: p.overrides.get(k, "") for k in swept}
    mark_pareto(points)
    header, body = rows(points, swept)
    cols = columns(points)
    with open(sweep_dir / CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header + ["error"])
        w.writerows([[p.dir, *(p.overrides.get(k, "") for k in swept), *(p.metrics.get(k) for k in cols),
                      p.pareto, ""] for p in points])
        w.writerows([[p.dir, *(p.overrides.get(k, "") for k in swept), *("" for _ in cols), "", p.error]
                     for p in failed])
    table = markdown(header, body) if points else f"No plot: {NO_PLOT}.\n"
    threads = {str(p.metrics.get("threads") or "unknown") for p in points}
    if len(threads) > 1 and "model.threads" not in swept:  # speed figures of different thread counts: say so
        note = f"The points ran with different torch thread counts ({', '.join(sorted(threads))}): their tokens/s " \
               f"are not comparable."
        log.warning(note)
        table += f"\n{note}\n"
    for p in points:  # merged lm-eval shards: a metric that could not be recomputed exactly has no number
        for name, why in (p.metrics.get("lm_eval") or {}).get("not_merged", {}).items():
            table += f"\nPoint {p.dir}: {name} is not merged over its shards ({why}); it has no value.\n"
    if failed:
        table += f"\n{len(failed)} failed point(s):\n\n" + markdown(
            ["point", *swept, "error", "log"],
            [[str(p.dir), *(p.overrides.get(k, "") for k in swept), p.error.replace("|", "/").replace("\n", " "),
              p.log] for p in failed])
    (sweep_dir / MARKDOWN).write_text(table)
    plot_path = None
    if points:
        m0 = points[0].metrics
        plot_path = sweep_dir / PLOT
        plot(points, plot_path, f"{m0.get('model', '?')} on {m0.get('task', '?')}: accuracy vs tokens/s")
    rep = Report(points, swept, sweep_dir / CSV, sweep_dir / MARKDOWN, plot_path, table, failed)
    log.info("sweep report of %d points: %s, %s, %s", len(points), rep.csv, rep.markdown,
             rep.plot or f"no plot ({NO_PLOT})")
    for p in failed:
        log.error("point %s failed: %s (log: %s)", p.dir, p.error, p.log)
    if log_wandb:
        _log_wandb(rep, sweep_dir)
    return rep


def _log_wandb(rep: Report, sweep_dir: Path) -> None:
    """One run of job_type "report" in the points' W&B group: the table (swept values typed: numbers are numbers), the
    failed points and the plot — or, when no point finished, the summary's `plot` saying why there is none."""
    from llada_xp.config import LoggerConfig
    from llada_xp.evaluate import init_wandb

    cfgs = [p.metrics.get("config", {}).get("logger", {}) for p in rep.points] + [p.logger for p in rep.failed]
    cfgs = [c for c in cfgs if c.get("name") == "wandb"]
    if not cfgs:
        return
    import wandb

    cfg = LoggerConfig(**cfgs[0])
    run = init_wandb(cfg, job_type="report", name=f"report-{cfg.group or sweep_dir.name}",
                     config=dict(sweep_dir=str(sweep_dir), points=len(rep.points), failed=len(rep.failed),
                                 swept=rep.swept))
    ok = False
    try:
        logged = {}
        if rep.points:
            cols = columns(rep.points)
            header = ["point", *rep.swept, *cols, "pareto"]
            data = [[str(p.dir), *typed_overrides([f"{k}={p.params[k]}" for k in rep.swept]).values(),
                     *(p.metrics.get(k) for k in cols), p.pareto] for p in rep.points]
            logged["sweep"] = wandb.Table(columns=header, data=data, allow_mixed_types=True)
        if rep.failed:
            data = [[str(p.dir), *(p.overrides.get(k, "") for k in rep.swept), p.error, p.log] for p in rep.failed]
            logged["failed"] = wandb.Table(columns=["point", *rep.swept, "error", "log"], data=data)
        if rep.plot:
            logged["quality_vs_speed"] = wandb.Image(str(rep.plot))
        else:
            run.summary["plot"] = f"none: {NO_PLOT}"
        run.log(logged)
        ok = True
    finally:
        run.finish(exit_code=0 if ok else 1)


class ReportCallback(Callback):
    """Hydra callback: the sweep report when a multirun ends (conf/eval.yaml, hydra.callbacks.report)."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        rep = report(Path(config.hydra.sweep.dir))
        if rep.failed:  # the others' results are written; the sweep as a whole did not succeed
            log.error("%d of %d points failed; see %s", len(rep.failed), len(rep.failed) + len(rep.points),
                      rep.markdown)
            sys.exit(1)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m llada_xp.report", description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir", type=Path, help="a multirun's sweep dir (multirun/eval/DATE/TIME)")
    ap.add_argument("--no-wandb", action="store_true", help="do not log to W&B even if the points did")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        rep = report(args.sweep_dir, log_wandb=not args.no_wandb)
    except ReportError as e:
        raise SystemExit(f"error: {e}") from None
    print(rep.table)
    print(f"wrote {rep.csv}, {rep.markdown}" + (f", {rep.plot}" if rep.plot else ""))
    if rep.failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
