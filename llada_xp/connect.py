"""Print how to reach a running server job and check its /health: python -m llada_xp.connect JOB_ID [options].

The node comes from `squeue -j JOB_ID -h -o %N` (or --node), the port and API key file from the job's
server-info file (found next to the job's stdout log, or given with --info), else --port: with replicas, the
gateway's one public address (the file lists every replica). Exit status 0 when /health answers through the
printed address, 1 otherwise. Knows nothing about models; the block is launch.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llada_xp.launch import INFO_FILE, connection_block, health, job_state, login_host, stdout_folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llada_xp.connect", description=__doc__.splitlines()[0])
    p.add_argument("job_id", help="the SLURM job id of the server (printed by serve.py launcher=slurm)")
    p.add_argument("--port", type=int, help="the server's port (default: from the server-info file, else 8000)")
    p.add_argument("--node", help="the compute node (default: squeue -j JOB_ID -h -o %%N)")
    p.add_argument("--login-host", help="the SSH login host (default: $SLURM_SUBMIT_HOST, else this machine)")
    p.add_argument("--info", type=Path, help=f"the job's {INFO_FILE} (default: next to the job's stdout log)")
    p.add_argument("--no-check", action="store_true", help="print the block without checking /health")
    a = p.parse_args(argv)

    st = job_state(a.job_id)
    if st.state != "RUNNING" and not a.node:
        reason = f"{st.state or 'unknown to squeue and sacct'}" + (f" ({st.reason})" if st.reason else "")
        print(f"connect: job {a.job_id} is not running: {reason}", file=sys.stderr)
        return 1
    info_file = a.info or ((stdout_folder(a.job_id) or Path("/nonexistent")) / INFO_FILE)
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    node = a.node or info.get("node") or st.node
    port = a.port or info.get("port") or 8000
    print(connection_block(a.job_id, node, port, login_host(a.login_host), info.get("key_file"),
                           str(info_file) if info else None, info.get("model"), info), end="")
    if a.no_check:
        return 0
    url = f"http://{node}:{port}/health"  # with replicas: the gateway's
    body = health(url)
    if body is None:
        print(f"connect: {url} does not answer 200 (still loading, or another port?)", file=sys.stderr)
        return 1
    print(f"connect: {url} is healthy (model {info.get('model') or (body.get('model') or {}).get('name')}"
          + (f", {len(info['replicas'])} replicas" if info.get("replicas") else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
