"""Run by ``test_multinode.py`` in its own process: a Ray cluster of a head and two worker nodes on this machine.

Each worker node offers one ``engine_slot``; the app asks one per engine replica, so the
two replicas land on different nodes; the HTTP proxy and the ingress stay on the head
(``gateway`` resource), as on a cluster whose gateway nodes are not the GPU nodes. The script checks that both answer, then removes
one worker node while four clients keep sending requests (Ray is told to declare a lost
node dead within about 2 s; requests in flight on it wait that long, then are retried on
the survivor or fail with 503), and prints one JSON object:
the nodes that answered ``/health``, and every request's (seconds since start, status,
error code) with the time the node was removed.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import ray
from ray import serve
from ray.cluster_utils import Cluster

from attnscope.deployments.application import build_app

CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "temperature": 0}


def call(url: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """Status and JSON body of one request."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def main() -> None:
    """Start the cluster and the app, probe, remove a node under load, report."""
    port = int(sys.argv[1])
    store = 80 * 2**20
    # Declare a lost node dead after ~2 s (Ray's default waits ~30 s): requests in flight on it wait that long.
    detection = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store,
                                                            "resources": {"gateway": 1},
                                                            "include_dashboard": False, "_system_config": detection})
    workers = [cluster.add_node(num_cpus=1, resources={"engine_slot": 1}, object_store_memory=store)
               for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    url = f"http://127.0.0.1:{port}"
    report: dict = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        serve.run(build_app({"device": "cpu", "num_kv_blocks": 64, "num_replicas": 2, "engine_num_cpus": 0.5,
                             "num_threads": 1, "engine_resources": {"engine_slot": 1},
                             "ingress_resources": {"gateway": 0.5}}), name="multi", route_prefix="/")
        with ThreadPoolExecutor(8) as pool:  # concurrent probes, so the shortest-queue choice spreads them
            report["health_nodes"] = sorted({body["node_id"] for _, body in pool.map(
                lambda _: call(url, "/health"), range(64))})
        report["worker_nodes"] = sorted(w.node_id for w in workers)
        results: list[tuple[float, int, str | None]] = []
        started = time.monotonic()
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                status, body = call(url, "/v1/chat/completions", CHAT)
                results.append((time.monotonic() - started, status, (body.get("error") or {}).get("code")))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(4)
        report["removed_at"] = time.monotonic() - started
        cluster.remove_node(workers[0])
        time.sleep(15)
        stop.set()
        for t in threads:
            t.join()
        report["requests"] = results
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
