import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Tiny models: one thread is faster than two fighting over 2 cores (also for the subprocesses tests start).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_sessionfinish(session, exitstatus):
    """LLADA_XP_NO_SKIPS=1 (.ci/run): a skipped test fails the run — CI installs every extra and starts SLURM, so a
    skip there means a dependency went missing, not an optional feature."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("LLADA_XP_NO_SKIPS") == "1" and skipped and session.exitstatus == 0:
        reporter.ensure_newline()
        reporter.write_line(f"LLADA_XP_NO_SKIPS=1: {len(skipped)} test(s) skipped", red=True)
        session.exitstatus = 1
