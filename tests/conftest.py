import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Tiny models: one thread is faster than two fighting over 2 cores (also for the subprocesses tests start).
os.environ.setdefault("OMP_NUM_THREADS", "1")
