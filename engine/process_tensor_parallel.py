"""Tensor-parallel rank workers as child processes of this one (one machine, no Ray).

The same ``RankWorker`` as the Ray runner, each in a spawned process that answers calls
over a pipe; rank ``r`` sees only GPU ``r`` on CUDA. Used where Ray is not installed or not
wanted (a single host, benchmarks); the Serve deployment uses the Ray runner, whose workers
live in the replica's placement group and can span a node's GPUs under Ray's control.
"""

from __future__ import annotations

import os
import socket
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing as mp

from attnscope.actors.rank_worker import RankWorker
from attnscope.engine.capture_plan import StepCapture
from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.model_runner import StepInputs


class RankProcessError(RuntimeError):
    """A rank process failed a call or is gone."""


def _serve_rank(conn: Connection, config: EngineConfig, rank: int) -> None:
    """A rank process: build the worker, then answer ``(method, args)`` calls until ``stop``."""
    if config.resolved_device().type == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)
    worker = RankWorker(config, rank)
    while True:
        method, args = conn.recv()
        try:
            conn.send(("ok", getattr(worker, method)(*args)))
        except Exception as exc:  # reported to the driver, which raises it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        if method == "stop":
            return


class ProcessTensorParallelRunner:
    """Starts, drives and stops rank processes; the same contract as ``TensorParallelRunner``."""

    def __init__(self, config: EngineConfig) -> None:
        context = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs = []
        for rank in range(config.tensor_parallel_size):
            parent, child = context.Pipe()
            proc = context.Process(target=_serve_rank, args=(child, config, rank), daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        self.num_blocks = min(self._call_all("start", address))
        self._call_all("allocate", self.num_blocks)

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` on every rank at once and collect the answers in rank order."""
        for conn in self._conns:
            conn.send((method, args))
        answers = []
        for rank, conn in enumerate(self._conns):
            try:
                status, value = conn.recv()
            except EOFError as exc:
                raise RankProcessError(f"rank {rank} exited") from exc
            if status == "error":
                raise RankProcessError(f"rank {rank}: {value}")
            answers.append(value)
        return answers

    def run(self, inputs: StepInputs, capture: StepCapture | None) -> torch.Tensor:
        """Run one step on every rank; rank 0's logits, and the merged captures filled into ``capture``."""
        outputs = self._call_all("run", inputs, capture.shipped() if capture is not None else None)
        if capture is not None:
            capture.fill_from_ranks(outputs[0].captures)
        return outputs[0].logits

    @property
    def pids(self) -> list[int]:
        """Process ids of the ranks, in rank order."""
        return [proc.pid for proc in self._procs]

    def check_health(self) -> None:
        """Raise if a rank process has exited."""
        for rank, proc in enumerate(self._procs):
            if not proc.is_alive():
                raise RankProcessError(f"rank {rank} exited with code {proc.exitcode}")

    def shutdown(self) -> None:
        """Stop the rank processes."""
        for conn, proc in zip(self._conns, self._procs):
            if proc.is_alive():
                try:
                    conn.send(("stop", ()))
                except (BrokenPipeError, OSError):
                    pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        self._conns, self._procs = [], []
