"""``attnscope serve`` as a user runs it: its own Ray cluster, the URLs printed, answers, a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from loopback import free_port

pytestmark = pytest.mark.slow



def test_attnscope_serve_prints_its_urls_answers_and_stops_on_sigterm(tmp_path):
    port = free_port()
    cli = Path(sys.executable).with_name("attnscope")
    log = (tmp_path / "serve.log").open("w+")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([str(cli), "serve", "--port", str(port), "--num-cpus", "1", "--no-dashboard",
                             "--num-kv-blocks", "64", "--return-attention-tokens", "--attention-fingerprint-mode"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C to stop" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.5)
        printed = (tmp_path / "serve.log").read_text()
        assert f"http://127.0.0.1:{port}/v1" in printed and "/v1/attention/capabilities" in printed
        body = json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                           "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.load(resp)
        choice = answer["choices"][0]
        assert "Paris" in choice["message"]["content"]
        assert len(choice["attention_tokens"][0]["fingerprint"]) == 20
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
