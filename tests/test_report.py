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
