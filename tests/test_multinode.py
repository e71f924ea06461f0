"""Replicas on different nodes of a real multi-node Ray cluster (head + two workers on this machine).

The cluster lives in its own process (``multinode_serve.py``), apart from the suite's
session cluster. Removing one worker node under load: every request either succeeds or
gets a clean 503 ``engine_unavailable`` (requests whose replica dies before anything was
sent are retried once on the other replica), and the surviving replica keeps serving.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from loopback import free_port

pytestmark = pytest.mark.slow


def test_two_replicas_on_two_nodes_survive_losing_one(tmp_path):
    port = free_port()
    script = Path(__file__).with_name("multinode_serve.py")
    done = subprocess.run([sys.executable, str(script), str(port)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["health_nodes"] == report["worker_nodes"]  # both replicas answer, one per worker node
    requests = report["requests"]
    assert {status for _, status, _ in requests} <= {200, 503}
    assert all(code == "engine_unavailable" for _, status, code in requests if status == 503)
    before = [status for at, status, _ in requests if at < report["removed_at"]]
    after = [status for at, status, _ in requests if at > report["removed_at"] + 5]
    assert before and all(s == 200 for s in before)
    assert after and all(s == 200 for s in after)
