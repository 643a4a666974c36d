"""Point-to-point ring exchange: send a buffer to the next rank, receive the previous one's.

One ``dist.batch_isend_irecv`` per exchange, so NCCL runs the send and the
receive as one fused group on its own stream while the caller computes on
the block it already has; ``wait()`` is called only when the next block is
needed. Nothing here synchronises the device: waiting on the returned work
makes the compute stream wait for the communication stream, no more.
"""

from __future__ import annotations

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

    def send_recv(self, buffer: torch.Tensor, tag: int = 0) -> torch.Tensor:
        """Start sending ``buffer`` to the next rank; return the buffer the previous rank's data lands in.

        ``tag`` keeps concurrent exchanges apart on backends that match
        messages by tag (gloo); the received tensor is valid after ``wait()``.
        """
        buffer = buffer.contiguous()
        received = torch.empty_like(buffer)
        ops = [dist.P2POp(dist.isend, buffer, self.next_rank, self.group, tag),
               dist.P2POp(dist.irecv, received, self.prev_rank, self.group, tag)]
        self._works.extend(dist.batch_isend_irecv(ops))
        return received

    def wait(self) -> None:
        """Block until every exchange started since the last wait has finished."""
        for work in self._works:
            work.wait()
        self._works.clear()
