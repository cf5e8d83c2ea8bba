"""torch.distributed collectives with a per-rank byte count (what each rank sends / receives).

Counting rule (the logical payload, independent of the collective's algorithm):

* ``all_gather`` of an ``n``-byte tensor: sends ``n * (W - 1)`` (its piece to every other rank),
  receives ``n * (W - 1)`` (every other piece); this is also what a ring all-gather moves;
* ``all_to_all_single``: sends the bytes of its splits for the other ranks, receives theirs
  (the split a rank keeps for itself is not counted);
* ``send`` / ``recv`` pairs: the tensor's bytes.

Pieces padded to a common length for ``all_gather`` are counted padded (that is what moves).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["CountingComm", "Traffic"]


@dataclass
class Traffic:
    """Bytes one rank sent / received, in total and per phase (e.g. ``"score"``, ``"kv"``)."""

    sent: int = 0
    recv: int = 0
    by_phase: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    def add(self, phase: str, sent: int, recv: int) -> None:
        self.sent += int(sent)
        self.recv += int(recv)
        entry = self.by_phase[phase]
        entry[0] += int(sent)
        entry[1] += int(recv)

    def as_dict(self) -> dict:
        return {
            "sent": self.sent,
            "recv": self.recv,
            "by_phase": {k: {"sent": v[0], "recv": v[1]} for k, v in self.by_phase.items()},
        }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CountingComm:
    """A process group plus a :class:`Traffic` record of everything sent through it."""

    def __init__(self, group=None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "prism.distributed needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group, e.g. under torchrun)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.traffic = Traffic()

    def _global(self, r: int) -> int:
        """Group rank -> global rank (what point-to-point calls take)."""
        if self.group is None:
            return r
        return dist.get_global_rank(self.group, r)

    def all_gather(self, t: torch.Tensor, phase: str) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on every rank), in rank order."""
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.group)
        n = _nbytes(t) * (self.world_size - 1)
        self.traffic.add(phase, n, n)
        return out

    def all_to_all(
        self,
        send: torch.Tensor,
        send_splits: list[int],
        recv_splits: list[int],
        phase: str,
        async_op: bool = False,
    ):
        """``all_to_all_single`` along dim 0 with the given split sizes (rows). Returns the
        receive buffer, and the work handle when ``async_op``."""
        send = send.contiguous()
        row = send.element_size() * math.prod(send.shape[1:])
        recv = send.new_empty((sum(recv_splits), *send.shape[1:]))
        work = dist.all_to_all_single(
            recv, send, recv_splits, send_splits, group=self.group, async_op=async_op
        )
        me = self.rank
        sent = sum(n for r, n in enumerate(send_splits) if r != me) * row
        got = sum(n for r, n in enumerate(recv_splits) if r != me) * row
        self.traffic.add(phase, sent, got)
        return (recv, work) if async_op else recv

    def exchange_counts(self, counts: list[int], device, phase: str) -> list[int]:
        """All-to-all of one int per peer: rank ``r`` receives ``counts_of_peer[r]``."""
        send = torch.tensor(counts, dtype=torch.int64, device=device)
        recv = self.all_to_all(send, [1] * self.world_size, [1] * self.world_size, phase)
        return [int(x) for x in recv.tolist()]

    def ring_shift(self, t: torch.Tensor, phase: str):
        """Start sending ``t`` to rank+1 and receiving the same shape from rank-1; returns
        ``(recv_buffer, [works])`` (wait on the works before reading the buffer)."""
        t = t.contiguous()
        recv = torch.empty_like(t)
        w = self.world_size
        ops = [
            dist.P2POp(dist.isend, t, self._global((self.rank + 1) % w), self.group),
            dist.P2POp(dist.irecv, recv, self._global((self.rank - 1) % w), self.group),
        ]
        works = dist.batch_isend_irecv(ops)
        self.traffic.add(phase, _nbytes(t), _nbytes(t))
        return recv, works
