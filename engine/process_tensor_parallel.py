"""Tensor-parallel rank workers as child processes of this one (one machine, no Ray).

The same ``RankWorker`` as the Ray runner, each in a spawned process that answers calls
over a pipe; rank ``r`` sees only GPU ``r`` on CUDA. Messages are pickled with
``_WirePickler``: small CPU tensors (a step's capture settings, results) travel by value
as numpy arrays, large ones (logits) through shared memory as torch.multiprocessing
sends them. Sending every tensor through shared memory costs a file-descriptor hand-off
each: a round trip of 30 small tensors took 11 ms that way and 0.5 ms by value (2-core CPU).

Used where Ray is not installed or not wanted (a single host, benchmarks); the Serve
deployment uses the Ray runner, whose workers live in the replica's placement group and
can span a node's GPUs under Ray's control.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing as mp

from attnscope.actors.rank_worker import RankWorker
from attnscope.engine.capture_plan import StepCapture
from attnscope.engine.engine_config import EngineConfig
from attnscope.engine.model_runner import StepInputs


SMALL_TENSOR_BYTES = 1 << 16  # CPU tensors up to this size are pickled by value


class RankProcessError(RuntimeError):
    """A rank process failed a call or is gone."""


class _WirePickler(ForkingPickler):
    """torch.multiprocessing's pickler, except that small CPU tensors go by value (as numpy arrays)."""

    def reducer_override(self, obj: Any) -> Any:
        """Reduce a small CPU tensor numpy can hold to ``torch.from_numpy(array)``; defer on anything else."""
        if (type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.dtype != torch.bfloat16
                and obj.numel() * obj.element_size() <= SMALL_TENSOR_BYTES):
            return torch.from_numpy, (obj.detach().numpy(),)
        return NotImplemented


def _send(conn: Connection, message: Any) -> None:
    """Pickle ``message`` with ``_WirePickler`` and send it."""
    buffer = io.BytesIO()
    _WirePickler(buffer, pickle.HIGHEST_PROTOCOL).dump(message)
    conn.send_bytes(buffer.getbuffer())


def _receive(conn: Connection) -> Any:
    """The next message on ``conn``."""
    return pickle.loads(conn.recv_bytes())


def _serve_rank(conn: Connection, config: EngineConfig, rank: int) -> None:
    """A rank process: build the worker, then answer ``(method, args)`` calls until ``stop``."""
    if config.resolved_device().type == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)
    worker = RankWorker(config, rank)
    while True:
        method, args = _receive(conn)
        try:
            _send(conn, ("ok", getattr(worker, method)(*args)))
        except Exception as exc:  # reported to the driver, which raises it
            _send(conn, ("error", f"{type(exc).__name__}: {exc}"))
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
        self.shapes = self._call_all("allocate", self.num_blocks)[0]

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` on every rank at once and collect the answers in rank order."""
        for conn in self._conns:
            _send(conn, (method, args))
        answers = []
        for rank, conn in enumerate(self._conns):
            try:
                status, value = _receive(conn)
            except EOFError as exc:
                raise RankProcessError(f"rank {rank} exited") from exc
            if status == "error":
                raise RankProcessError(f"rank {rank}: {value}")
            answers.append(value)
        return answers

    def run(self, inputs: StepInputs, capture: StepCapture | None) -> torch.Tensor:
        """Run one step on every rank; rank 0's logits, and the merged captures filled into ``capture``."""
        outputs = self._call_all("run", inputs, capture.shipped(self.shapes) if capture is not None else None)
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
        """Stop the rank processes, rank 0 last: it hosts the process group's store, which the others still
        reach while they leave the group."""
        for conn, proc in reversed(list(zip(self._conns, self._procs))):
            if proc.is_alive():
                try:
                    _send(conn, ("stop", ()))
                except (BrokenPipeError, OSError):
                    pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        self._conns, self._procs = [], []
