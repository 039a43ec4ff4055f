"""Policy → rollout-engine weight transport, behind one interface (ARCHITECTURE.md §4).

After each update the policy's weights are sent to every rollout engine in buckets (never one
RPC per parameter). With ZeRO-3 the gather is a collective: every policy rank walks the buckets
in the same order and rank 0 sends. Transports:

- `object_store`: rank 0 puts each bucket in Ray's object store as a dict of numpy arrays
  (zero-copy on get; torch tensors would be pickled, ~4× slower — STACK-NOTES); engines get them.
- `cuda_ipc` (GPU, policy rank r and engine r on one GPU): rank r's full weights as CUDA IPC
  handles through the object store (bytes, not weights); the engine opens and copies them.
- `gloo` (CPU) / `nccl` (GPU): a stateless process group (TCPStore + ProcessGroupGloo or
  ProcessGroupNCCL, no global state) of policy rank 0 and the engines' receivers; per bucket one
  small header (names, shapes, dtypes as JSON) and one byte-flat broadcast. An empty header ends
  the sync. A tensor-parallel vLLM engine joins with one receiver per shard.

Every engine then reports the version it holds and its log-probs of a fixed probe sequence
(`rollout.base.probe_tokens`); the driver compares them with the policy's before the next rollout.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import ray
import torch
from torch import Tensor


Bucket = list[tuple[str, Tensor]]


def to_numpy(t: Tensor) -> np.ndarray:
    """numpy has no bfloat16: send its bits as int16; `from_numpy_like` views them back."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


# --- object store -----------------------------------------------------------------------------


def put_buckets(buckets: Iterator[Bucket], is_source: bool) -> list[ray.ObjectRef]:
    """Walk every bucket (collective under ZeRO-3); on the source rank put each one."""
    refs = []
    for bucket in buckets:
        if is_source:
            refs.append(ray.put({name: to_numpy(t) for name, t in bucket}))
    return refs


def get_weights(refs: list[ray.ObjectRef], timeout_s: float) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) over every bucket, fetched one bucket at a time."""
    for ref in refs:
        yield from ray.get(ref, timeout=timeout_s).items()


# --- CUDA IPC (policy rank and engine on one GPU) --------------------------------------------


def share_cuda_ipc(named: list[tuple[str, Tensor]]) -> list[tuple[str, Any]]:
    """(name, CUDA tensor) → (name, IPC handle): a small picklable record another process on the same
    GPU opens without a copy (torch's own reduction, as torch.multiprocessing uses)."""
    from torch.multiprocessing.reductions import reduce_tensor

    return [(name, reduce_tensor(t)) for name, t in named]


def open_cuda_ipc(handles: list[tuple[str, Any]]) -> Iterator[tuple[str, Tensor]]:
    for name, (rebuild, args) in handles:
        yield name, rebuild(*args)


# --- stateless collective channel -----------------------------------------------------------


class CollectiveChannel:
    """A process group of policy rank 0 (rank 0) and the engines' receivers (ranks 1…M): gloo for
    CPU tensors, NCCL when `device` is a GPU."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float,
                 device: torch.device | str = "cpu"):
        timeout = timedelta(seconds=timeout_s)
        self.device = torch.device(device)
        self.store = torch.distributed.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        if self.device.type == "cuda":
            options = torch.distributed.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.process_group = torch.distributed.ProcessGroupNCCL(self.store, rank, world_size, options)
        else:
            self.process_group = torch.distributed.ProcessGroupGloo(self.store, rank, world_size, timeout)
        self.rank = rank

    def _broadcast(self, t: Tensor) -> None:
        self.process_group.broadcast(t, 0).wait()

    def send(self, buckets: Iterator[Bucket], is_source: bool) -> None:
        for bucket in buckets:
            if is_source:
                self._send_bucket(bucket)
        if is_source:
            self._send_header([])

    def _send_header(self, layout: list[list[Any]]) -> None:
        header = torch.frombuffer(bytearray(json.dumps(layout).encode()), dtype=torch.uint8) if layout else torch.zeros(0, dtype=torch.uint8)
        self._broadcast(torch.tensor([header.numel()], dtype=torch.int64, device=self.device))
        if header.numel():
            self._broadcast(header.to(self.device))

    def _send_bucket(self, bucket: Bucket) -> None:
        tensors = [t.detach().to(self.device).contiguous() for _, t in bucket]
        self._send_header([[name, list(t.shape), str(t.dtype).removeprefix("torch.")] for (name, _), t in zip(bucket, tensors)])
        self._broadcast(torch.cat([t.view(-1).view(torch.uint8) for t in tensors]))

    def receive(self) -> Iterator[dict[str, Tensor]]:
        """Yield buckets {name: tensor} until the sender's empty header."""
        while True:
            size = torch.zeros(1, dtype=torch.int64, device=self.device)
            self._broadcast(size)
            if size.item() == 0:
                return
            header = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
            self._broadcast(header)
            layout = json.loads(bytes(header.cpu().numpy()).decode())
            yield self._receive_bucket(layout)

    def _receive_bucket(self, layout: list[list[Any]]) -> dict[str, Tensor]:
        specs = [(name, shape, getattr(torch, dtype)) for name, shape, dtype in layout]
        sizes = [int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size() for _, shape, dtype in specs]
        flat = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
        self._broadcast(flat)
        out, offset = {}, 0
        for (name, shape, dtype), size in zip(specs, sizes):
            out[name] = flat[offset: offset + size].view(dtype).view(shape)
            offset += size
        return out
