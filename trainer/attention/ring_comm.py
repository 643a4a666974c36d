"""Point-to-point ring exchange: send a buffer to the next rank, receive the previous one's.

One ``dist.batch_isend_irecv`` per exchange, so NCCL runs the send and the
receive as one fused group on its own stream while the caller computes on
the block it already has; ``wait()`` is called only when the next block is
needed. Nothing here synchronises the device: waiting on the returned work
makes the compute stream wait for the communication stream, no more.

The time spent in ``wait()`` is the ring communication that compute did not
hide. It is added up per process (``take_wait_seconds``): on CPU as host
time, on CUDA as the compute stream's stall between two timing events, read
only when the step's report asks for it.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.distributed as dist

from trainer.groups import ParallelGroups


class _WaitClock:
    """Time this process waited on ring exchanges since the last ``take``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def take(self) -> float:
        total = self.seconds
        for start, end in self.events:
            end.synchronize()
            total += start.elapsed_time(end) / 1e3
        self.seconds, self.events = 0.0, []
        return total


_clock = _WaitClock()


def take_wait_seconds() -> float:
    """Seconds spent waiting on ring exchanges in this process since the last call (then reset)."""
    return _clock.take()


class RingComm:
    """Exchanges with the ring neighbours of one rank (``groups.next_rank`` / ``prev_rank``)."""

    def __init__(self, groups: ParallelGroups):
        self.group = groups.ring_group
        self.next_rank = groups.next_rank
        self.prev_rank = groups.prev_rank
        self._works: list[dist.Work] = []
        self._cuda = False

    def send_recv(self, buffers: Sequence[torch.Tensor], tag: int = 0) -> list[torch.Tensor]:
        """Start sending ``buffers`` to the next rank; return the buffers the previous rank's data lands in.

        Several tensors (K and V) go as separate messages of one batch, so
        none is copied into a combined buffer. Tensor ``i`` uses tag
        ``tag + i``, which keeps concurrent exchanges apart on backends that
        match messages by tag (gloo); the received tensors are valid after ``wait()``.
        """
        ops, received = [], []
        for i, buffer in enumerate(buffers):
            buffer = buffer.contiguous()
            into = torch.empty_like(buffer)
            ops += [dist.P2POp(dist.isend, buffer, self.next_rank, self.group, tag + i),
                    dist.P2POp(dist.irecv, into, self.prev_rank, self.group, tag + i)]
            received.append(into)
        self._works.extend(dist.batch_isend_irecv(ops))
        self._cuda = buffer.is_cuda
        return received

    def wait(self) -> None:
        """Block until every exchange started since the last wait has finished."""
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._wait()
            end.record()
            _clock.events.append((start, end))
            if len(_clock.events) >= 4096:  # nobody is taking them (an evaluation): fold, keep the list short
                _clock.seconds = _clock.take()
        else:
            t0 = time.perf_counter()
            self._wait()
            _clock.seconds += time.perf_counter() - t0

    def _wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works.clear()
