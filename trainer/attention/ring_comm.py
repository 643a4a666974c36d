"""Point-to-point ring exchange: send a buffer to the next rank, receive the previous one's.

One ``dist.batch_isend_irecv`` per exchange, so NCCL runs the send and the
receive as one fused group on its own stream while the caller computes on
the block it already has; ``wait()`` is called only when the next block is
needed. Nothing here synchronises the device: waiting on the returned work
makes the compute stream wait for the communication stream, no more.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from trainer.groups import ParallelGroups


class RingComm:
    """Exchanges with the ring neighbours of one rank (``groups.next_rank`` / ``prev_rank``)."""

    def __init__(self, groups: ParallelGroups):
        self.group = groups.ring_group
        self.next_rank = groups.next_rank
        self.prev_rank = groups.prev_rank
        self._works: list[dist.Work] = []

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
        return received

    def wait(self) -> None:
        """Block until every exchange started since the last wait has finished."""
        for work in self._works:
            work.wait()
        self._works.clear()
