"""Sweep reports from output dirs: table rows, swept columns, the Pareto front, the PNG, the CLI and the callback."""

import csv
import json

import pytest
import yaml
from omegaconf import OmegaConf

from llada_xp.report import CSV, MARKDOWN, PLOT, ReportCallback, ReportError, main, report

# (threshold, cache, accuracy, tokens/s): 1 and 3 are dominated, 0, 2 and 4 form the front
POINTS = [("0.5", "dual", 0.60, 400.0), ("0.5", "none", 0.55, 150.0), ("0.9", "dual", 0.80, 300.0),
          ("0.9", "none", 0.80, 100.0), ("1.0", "dual", 0.85, 120.0)]


def fake_sweep(root, points=POINTS, logger=None):
    for k, (thr, cache, acc, tps) in enumerate(points):
        d = root / str(k)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
            ["model=demo", f"sampler.threshold={thr}", f"sampler.cache={cache}"]))
        metrics = dict(accuracy=acc, tokens_per_s=tps, nfe_mean=10.0, tokens_per_forward_total=2.0, latency_p50_s=0.1,
                       n=50, model="llada-xp-demo", task="demo", config=dict(logger=logger or dict(name="none")))
        (d / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_report_tables_every_point_with_the_swept_settings_and_pareto_front(tmp_path):
    rep = report(fake_sweep(tmp_path))
    assert rep.swept == ["sampler.threshold", "sampler.cache"]  # model=demo is the same everywhere
    rows = list(csv.DictReader(open(tmp_path / CSV)))
    assert [r["point"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert [r["sampler.threshold"] for r in rows] == ["0.5", "0.5", "0.9", "0.9", "1.0"]
    assert [r["pareto"] for r in rows] == ["True", "False", "True", "False", "True"]
    assert float(rows[2]["accuracy"]) == 0.80 and float(rows[0]["tokens_per_s"]) == 400.0
    md = (tmp_path / MARKDOWN).read_text().splitlines()
    assert md[0].startswith("| point | sampler.threshold | sampler.cache | accuracy | tokens_per_s")
    assert len(md) == 2 + 5 and [r.endswith("| yes |") for r in md[2:]] == [True, False, True, False, True]


def test_report_plot_is_a_non_empty_png(tmp_path):
    report(fake_sweep(tmp_path))
    png = (tmp_path / PLOT).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_points_are_in_job_order_past_nine(tmp_path):
    pts = [("0.5", "dual", 0.5, float(k)) for k in range(12)]
    rep = report(fake_sweep(tmp_path, pts))
    assert [str(p.dir) for p in rep.points] == [str(k) for k in range(12)]


def test_report_cli_prints_the_table(tmp_path, capsys):
    main([str(fake_sweep(tmp_path)), "--no-wandb"])
    out = capsys.readouterr().out
    assert "| point | sampler.threshold" in out and str(tmp_path / PLOT) in out


def test_report_of_a_dir_without_points_says_so(tmp_path):
    with pytest.raises(ReportError, match="no metrics.json"):
        report(tmp_path)
    with pytest.raises(ReportError, match="sweep dir not found"):
        report(tmp_path / "missing")


def test_callback_reports_the_sweep_dir_when_the_multirun_ends(tmp_path):
    fake_sweep(tmp_path)
    ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert (tmp_path / CSV).exists() and (tmp_path / PLOT).exists()


def test_report_logs_table_and_plot_to_the_points_wandb_group(tmp_path, monkeypatch):
    from tests.test_eval import wandb_runs

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = dict(name="wandb", project="p", entity=None, group="sweep-7", tags=["x"], mode="offline",
                  dir=str(tmp_path / "wb"), log_samples=True)  # in-process, wandb reads $WANDB_DIR only once
    report(fake_sweep(tmp_path / "sweep", logger=logger))
    (run,) = wandb_runs(tmp_path / "wb")
    assert (run["group"], run["job_type"], run["exit"]) == ("sweep-7", "report", 0)
    assert {"sweep", "quality_vs_speed"} <= run["logged"]
    (table,) = run["dir"].glob("files/media/table/sweep_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"][:4] == ["point", "sampler.threshold", "sampler.cache", "accuracy"]
    assert [row[:4] for row in table["data"]] == [[str(k), float(t), c, a] for k, (t, c, a, _) in enumerate(POINTS)]


def fake_failure(d, threshold, logger):
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=demo", f"sampler.threshold={threshold}"]))
    (d / "failed.json").write_text(json.dumps(dict(error="sampler.threshold must be in [0, 1]", type="ValueError",
                                                   log=str(d / "eval.log"), logger=logger)))


def test_an_all_failed_sweep_logs_its_failures_and_says_why_there_is_no_plot(tmp_path, monkeypatch, caplog):
    from tests.test_eval import wandb_runs

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = dict(name="wandb", project="p", entity=None, group="sweep-8", tags=[], mode="offline",
                  dir=str(tmp_path / "wb"), log_samples=True)
    for k, thr in enumerate(("2.0", "3.0")):
        fake_failure(tmp_path / "sweep" / str(k), thr, logger)
    with caplog.at_level("INFO", logger="llada_xp.report"):
        rep = report(tmp_path / "sweep")
    assert rep.plot is None and not (tmp_path / "sweep" / PLOT).exists() and len(rep.failed) == 2
    assert "no plot (no point of the sweep finished)" in caplog.text and "None" not in caplog.text
    assert (tmp_path / "sweep" / MARKDOWN).read_text().startswith("No plot: no point of the sweep finished.")
    (run,) = wandb_runs(tmp_path / "wb")
    assert (run["group"], run["job_type"], run["exit"]) == ("sweep-8", "report", 0)
    assert "failed" in run["logged"] and "quality_vs_speed" not in run["logged"] and "sweep" not in run["logged"]
    assert run["summary"]["plot"] == "none: no point of the sweep finished" and run["config"]["failed"] == 2


def test_a_sharded_evaluation_with_a_missing_shard_is_listed_as_failed_not_plotted(tmp_path):
    fake_sweep(tmp_path, POINTS[:2])
    for k in ("0", "1"):  # shards 0 and 1 of 3 finished; shard 2 never ran
        m = json.loads((tmp_path / k / "metrics.json").read_text())
        m.update(key="abc", complete=True, shard=dict(index=int(k), num_shards=3))
        (tmp_path / k / "metrics.json").write_text(json.dumps(m))
        (tmp_path / k / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["num_shards=3", f"shard_index={k}"]))
    rep = report(tmp_path)
    assert rep.points == [] and rep.plot is None
    (failed,) = rep.failed
    assert str(failed.dir) == "0+1" and "shard index exactly once, got [0, 1]" in failed.error


def test_points_timed_with_different_thread_counts_are_flagged(tmp_path):
    fake_sweep(tmp_path)
    m = json.loads((tmp_path / "1" / "metrics.json").read_text())
    (tmp_path / "1" / "metrics.json").write_text(json.dumps(m | dict(threads=4)))
    rep = report(tmp_path)
    assert "different torch thread counts (4, unknown)" in rep.table
    rows = list(csv.DictReader(open(tmp_path / CSV)))
    assert [r["threads"] for r in rows] == ["", "4", "", "", ""]


def test_a_metric_not_merged_over_shards_is_named_without_a_number(tmp_path):
    fake_sweep(tmp_path, POINTS[:2])
    m = json.loads((tmp_path / "1" / "metrics.json").read_text())
    why = "a shard could not store its values per document exactly"
    m.update({"t/acc/none": 0.5, "lm_eval": dict(not_merged={"t/f1/none": why}), "merged_from": ["a", "b"]})
    (tmp_path / "1" / "metrics.json").write_text(json.dumps(m))
    rep = report(tmp_path)
    assert f"Point 1: t/f1/none is not merged over its shards ({why}); it has no value." in rep.table
    assert "t/f1/none" not in rep.table.splitlines()[0]
