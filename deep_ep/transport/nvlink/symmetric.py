"""Symmetric memory for the nvlink transport: one buffer per rank that every rank can load from and store into.

- :class:`CudaSymmetricMemory`: torch symmetric memory on the GPUs of one host (CUDA IPC over NVLink),
  with its device barrier.
- :class:`SharedSymmetricMemory`: the same on CPU ranks of one host, emulated with one shared-memory file
  per rank mapped into every rank (``/dev/shm``), and a barrier of flags in that memory. It runs the
  nvlink transport's code on a machine without a GPU: its kernels under Triton's interpreter (the same
  pointer arithmetic and flag protocol, flags written by one process seen by the others) or its torch
  twins. For tests (``DEEP_EP_NVLINK_EMULATE=1``); it is not a fast path.

Both give ``peers[p]`` (rank ``p``'s buffer as this process addresses it, ``uint8 [nbytes]``) and
``barrier()``; a kernel reaches rank ``p``'s buffer as its own moved by ``peers[p].data_ptr() -
peers[rank].data_ptr()`` bytes.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid
from typing import Any, List

import torch
import torch.distributed as dist

from ...errors import DeepEPError, DeepEPTimeoutError

__all__ = ["SymmetricMemory", "CudaSymmetricMemory", "SharedSymmetricMemory", "make_symmetric"]


class SymmetricMemory:
    """Every rank's buffer, addressable from this rank (see the module docstring).

    Attributes:
        rank, num_ranks: this rank and the group size.
        nbytes: bytes of each rank's buffer.
        peers: ``uint8 [nbytes]`` per rank.
    """

    rank: int
    num_ranks: int
    nbytes: int
    peers: List[torch.Tensor]

    def barrier(self) -> None:
        """Every rank reaches this point (in stream order on CUDA) before any goes on."""
        raise NotImplementedError

    def destroy(self) -> None:
        """Release the memory."""
        self.peers = []


class CudaSymmetricMemory(SymmetricMemory):
    """torch symmetric memory (``symm_mem.empty`` + ``rendezvous``) and its device barrier."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, nbytes: int, timeout_s: float) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.rank, self.num_ranks, self.nbytes = dist.get_rank(group), dist.get_world_size(group), nbytes
        name = getattr(group, "group_name", None)
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None and name is not None:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated (and unneeded) in newer torch
                try:
                    enable(name)
                except Exception:  # pragma: no cover
                    pass
        self.buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        try:
            self.hdl = symm_mem.rendezvous(self.buf, group)
        except TypeError:  # pragma: no cover - older torch takes the group name
            self.hdl = symm_mem.rendezvous(self.buf, name)
        self.peers = [self.hdl.get_buffer(p, (nbytes,), torch.uint8, 0) for p in range(self.num_ranks)]
        self._timeout_ms = int(timeout_s * 1000) + 10_000  # the host gives up first, with a better message

    def barrier(self) -> None:
        """The symmetric memory's device barrier (on the current stream)."""
        self.hdl.barrier(channel=0, timeout_ms=self._timeout_ms)

    def destroy(self) -> None:
        """Drop the buffer and the peers' views (the memory is freed with them)."""
        self.peers = []
        self.hdl = None
        self.buf = None


_SIGNAL_BYTES = 4096  # the barrier's flags: int64 per rank, after the data


class SharedSymmetricMemory(SymmetricMemory):
    """CPU emulation: a shared-memory file per rank, mapped by every rank; a barrier of int64 epochs, rank
    ``s`` writing its epoch into slot ``s`` of every rank's flags and waiting for every slot of its own."""

    def __init__(self, group: dist.ProcessGroup, nbytes: int, timeout_s: float) -> None:
        self.rank, self.num_ranks, self.nbytes = dist.get_rank(group), dist.get_world_size(group), nbytes
        self.timeout_s = timeout_s
        token: List[Any] = [uuid.uuid4().hex if self.rank == 0 else None]
        dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
        paths = [os.path.join(base, f"deep_ep_{token[0]}_{p}") for p in range(self.num_ranks)]
        total = nbytes + _SIGNAL_BYTES
        with open(paths[self.rank], "wb") as f:
            f.truncate(total)
        dist.barrier(group=group)  # every file exists
        self._maps = []
        self.peers, self._signals = [], []
        for p in range(self.num_ranks):
            fd = os.open(paths[p], os.O_RDWR)
            try:
                mm = mmap.mmap(fd, total)
            finally:
                os.close(fd)
            self._maps.append(mm)
            full = torch.frombuffer(mm, dtype=torch.uint8)
            self.peers.append(full[:nbytes])
            self._signals.append(full[nbytes:].view(torch.int64))
        dist.barrier(group=group)  # every rank mapped every file
        os.unlink(paths[self.rank])  # the mappings stay
        self._epoch = 0

    def barrier(self) -> None:
        """A host barrier through the shared flags, bounded by ``timeout_s`` (names the missing ranks)."""
        self._epoch += 1
        e, me = self._epoch, self.rank
        for sig in self._signals:
            sig[me] = e
        mine = self._signals[me]
        deadline = time.monotonic() + self.timeout_s
        spins = 0
        while True:
            got = mine[: self.num_ranks]
            if bool((got >= e).all()):
                return
            spins += 1
            if time.monotonic() > deadline:
                missing = [r for r in range(self.num_ranks) if int(got[r]) < e]
                raise DeepEPTimeoutError(
                    f"deep_ep: rank {me} waited {self.timeout_s:g}s at a barrier of the emulated nvlink "
                    f"transport; rank(s) {missing} did not arrive"
                )
            time.sleep(0 if spins < 1000 else 1e-4)

    def destroy(self) -> None:
        """Unmap every rank's memory."""
        self.peers, self._signals = [], []
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # a tensor still views it: the mapping goes with the last reference
                pass
        self._maps = []


def make_symmetric(
    group: dist.ProcessGroup, device: torch.device, nbytes: int, timeout_s: float, emulate: bool
) -> SymmetricMemory:
    """The symmetric memory of ``group``: CUDA symmetric memory on a CUDA device, the shared-memory
    emulation on CPU when ``emulate`` (``DEEP_EP_NVLINK_EMULATE=1``)."""
    if device.type == "cuda":
        return CudaSymmetricMemory(group, device, nbytes, timeout_s)
    if not emulate:
        raise DeepEPError(
            "backend='nvlink' needs an NCCL group on CUDA devices (on CPU ranks it runs only emulated, for "
            "tests: DEEP_EP_NVLINK_EMULATE=1)"
        )
    return SharedSymmetricMemory(group, nbytes, timeout_s)
