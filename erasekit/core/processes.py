"""The processes one erasekit command runs on: one (a plain ``erasekit ...`` or Python call), or several started
by a launcher (``accelerate launch``, ``torchrun``, ``mpirun``), on one machine or several.

:func:`current` is the one place erasekit asks: launched by a launcher it is ``accelerate.PartialState`` (the
``torch.distributed`` group set up from the launcher's environment: gloo on CPUs, NCCL on GPUs), otherwise a
:class:`SingleProcess` that needs neither accelerate's launcher nor ``torch.distributed``. Inside
:func:`alone` every caller sees a single process even when launched: the bench runs whole rows per process and
their audits and trainings must not wait for the other processes.

:class:`Part` is how a step's batch is split over the processes of a data-parallel training: each process computes
a contiguous block of the rows, weights its loss by its share, and the gradients are summed (:func:`all_sum`).
"""

from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch

from ..errors import ConfigError

#: environment variables in which launchers give the number of processes (torchrun / accelerate, MPI flavours)
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
#: how long a process waits for the others at a barrier before giving up: bench rows differ by hours, and the
#: main process prepares an audit's attacks (minutes) while the others wait
WAIT = timedelta(hours=24)

_alone: ContextVar[bool] = ContextVar("erasekit_alone", default=False)


class SingleProcess:
    """``accelerate.PartialState``'s interface for one process (barriers are no-ops)."""

    process_index = 0
    num_processes = 1
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def launched() -> bool:
    """Whether this process is one of several that a launcher started (its environment says so)."""
    return any(int(os.environ.get(name, "1") or "1") > 1 for name in WORLD_SIZE_VARIABLES)


def current(state: Any = None):
    """``state`` if given, else the processes of this run: ``accelerate.PartialState`` when launched (and not
    inside :func:`alone`), else a :class:`SingleProcess`.

    On a machine without CUDA, or under ``accelerate launch --cpu``, the processes talk over gloo on the CPU
    (``PartialState(cpu=True)``: without it accelerate sees no accelerator and each process would run alone).
    """
    if state is not None:
        return state
    if _alone.get() or not launched():
        return SingleProcess()
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu, timeout=WAIT)


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside the block, :func:`current` is a :class:`SingleProcess` (this process's own work, not shared)."""
    token = _alone.set(True)
    try:
        yield
    finally:
        _alone.reset(token)


def local_cuda_index() -> int:
    """The CUDA device of this process among several launched on one machine (``LOCAL_RANK``), else 0."""
    local = int(os.environ.get("LOCAL_RANK", "0") or "0") if launched() else 0
    return local % max(1, torch.cuda.device_count())


def all_sum(state, tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` in place over the processes of ``state`` (one collective call for all of them)."""
    if state.num_processes == 1 or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
    torch.distributed.all_reduce(flat)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def gather(state, obj: Any) -> list:
    """``obj`` of every process (JSON-like objects), in process order; ``[obj]`` for one process."""
    if state.num_processes == 1:
        return [obj]
    out: list = [None] * state.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_launch(count: int, cpu: bool = True) -> tuple[list[str], dict]:
    """The command prefix and environment that start ``count`` processes on this machine with accelerate's
    launcher (``[*prefix, "-m", "erasekit.cli", ...]``): on CPUs they talk over gloo, each with an equal share of
    the cores as its threads; on GPUs, one per device.

    ``accelerate launch --cpu`` starts its processes through ``mpirun`` only (without ``--mpirun_hostfile`` it
    starts one), so CPU processes use accelerate's torchrun launcher (``--multi_gpu``) with CUDA hidden; a free port
    keeps concurrent launches apart.
    """
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(count),
              "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    env = dict(os.environ)
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true",
                   OMP_NUM_THREADS=str(max(1, cpu_cores() // count)))
    return prefix, env


@dataclass(frozen=True)
class Part:
    """The rows of each step's global batch that one process computes, and the weight of its loss.

    A batch of ``n`` rows is split in contiguous blocks, process ``index`` of ``count`` taking rows
    ``[n·index // count, n·(index+1) // count)``; its loss, a mean over its rows, is weighted by its share of the
    rows (:meth:`mean`), so the weighted losses (and their gradients) summed over the processes are the
    single-process batch's. All randomness of the step is drawn for the whole batch on every process (the same
    generator), then sliced: the processes compute the single-process step.
    """

    index: int = 0
    count: int = 1

    def rows(self, n: int) -> slice:
        """This process's rows of a batch of ``n``."""
        if n < self.count:
            raise ConfigError(f"a batch of {n} sample{'s' * (n != 1)} cannot be split over {self.count} processes; "
                              f"use a batch size of at least {self.count} (or fewer processes)")
        return slice(n * self.index // self.count, n * (self.index + 1) // self.count)

    def mean(self, loss: torch.Tensor, n: int) -> torch.Tensor:
        """``loss`` (a mean over this process's rows of a batch of ``n``) weighted by the share of those rows."""
        if self.count == 1:
            return loss
        rows = self.rows(n)
        return loss * ((rows.stop - rows.start) / n)


#: the whole batch on one process
WHOLE = Part()

__all__ = ["Part", "SingleProcess", "WAIT", "WHOLE", "all_sum", "alone", "cpu_cores", "current", "gather", "launched",
           "local_cuda_index", "local_launch"]
