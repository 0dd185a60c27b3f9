"""The private local Ray runtime of a study is not open to others: it authenticates with a per-run token, so a
client without it is refused, and it leaves no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

STUDY_RUNTIME = """
import json, os, sys
import psutil
from workflows.execute import ClusterConfig, init_ray
init_ray(ClusterConfig(num_cpus=1))
import ray
assert ray.get(ray.remote(lambda: 1 + 1).remote()) == 2
me = psutil.Process()
listening = sorted({f"{c.laddr.ip}" for p in [me, *me.children(recursive=True)]
                    for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})
children = [p.pid for p in me.children(recursive=True)]
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "mode": os.environ["RAY_AUTH_MODE"],
                  "listening": listening, "children": children}), flush=True)
sys.stdin.readline()
ray.shutdown()
"""

INTRUDER = "import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); print('CONNECTED')"


def test_a_client_without_the_runtime_token_is_refused():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    study = subprocess.Popen([sys.executable, "-c", STUDY_RUNTIME], cwd=ROOT, env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        info = json.loads(study.stdout.readline())
        assert info["mode"] == "token" and info["children"]
        # Ray 2.60 listens beyond the loopback interface (so the token matters); recorded, not required
        print("listening on", info["listening"])
        intruder = subprocess.run([sys.executable, "-c", INTRUDER, info["gcs"]], cwd=ROOT, text=True, timeout=120,
                                  env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True)
        assert intruder.returncode != 0 and "CONNECTED" not in intruder.stdout
        assert "Authentication" in intruder.stderr or "auth" in intruder.stderr.lower(), intruder.stderr[-2000:]
    finally:
        study.communicate("\n", timeout=120)
    assert study.returncode == 0
    alive = [pid for pid in info["children"] if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"runtime processes left behind: {alive}"
