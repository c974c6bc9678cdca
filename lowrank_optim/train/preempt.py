"""Preemption: SIGTERM and SIGINT stop a run at the next step boundary, with a checkpoint.

While a run steps, SIGTERM (a cluster's preemption, ``kill``, torchrun forwarding its own SIGTERM) and
SIGINT (Ctrl-C) only set a flag. After the step in progress (its metrics written, and any scheduled
save finished), the run saves a checkpoint if it has not just saved one and raises :class:`Stopped`;
the command exits with status 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell
reports a process ended by that signal, so a job script can tell a preempted run from a finished one
(status 0) and requeue it with ``--resume``. Nothing is lost: the checkpoint is that of the last step.

A signal during a save never interrupts it (the save is not left half-written, and never leaves a
traceback). A second Ctrl-C outside a save stops at once (``KeyboardInterrupt``, status 130), keeping
the previous checkpoint. Under torchrun the ranks agree at every step boundary (one all-reduce of one
number), so all of them stop after the same step, even when only one received the signal.

The handlers are installed only while the run steps, and only from the main thread (Python's rule);
launchers give a stopped job some time before SIGKILL (torchrun 30 s after forwarding SIGTERM, Slurm
``KillWait``, 30 s by default): a save must fit in it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The run stopped after ``step`` because of the signal ``signum``, its checkpoint saved (when the run
    saves checkpoints)."""

    def __init__(self, signum: int, step: int, saved: bool) -> None:
        self.signum, self.step, self.saved = signum, step, saved
        name = signal.Signals(signum).name
        kept = (f"the checkpoint of step {step} is saved; --resume continues" if saved
                else "this run keeps no checkpoint")
        super().__init__(f"stopped by {name} after step {step}; {kept}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Within ``with StopSignals() as stop:``, SIGTERM and SIGINT set ``stop.signum`` (see the module doc)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saving = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT and not self._saving:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = self.signum or signum

    @contextmanager
    def saving(self) -> Iterator[None]:
        """A save in progress: signals wait until it is complete."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1

    def requested(self, world: int, device: torch.device, failed: bool = False) -> tuple[int | None, bool]:
        """(the signal that stops the run after this step, or None; whether some rank ``failed``), the same
        on every rank under torchrun (one all-reduce of two numbers)."""
        if world <= 1 or not (dist.is_available() and dist.is_initialized()):
            return self.signum, failed
        nccl_only = dist.get_backend() == "nccl"  # our own groups are "cpu:gloo,cuda:nccl": CPU tensors go by gloo
        flags = torch.tensor([float(self.signum or 0), float(failed)], device=device if nccl_only else "cpu")
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return int(flags[0].item()) or None, bool(flags[1].item())


__all__ = ["SIGNALS", "StopSignals", "Stopped"]
