"""What the runner needs to run unchanged under ``torchrun``: every rank trains on its shard of each
batch through DistributedDataParallel (gloo on CPU, nccl on GPU), metrics are reduced across ranks,
and only rank 0 writes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> tuple[int, int]:
    """Join the process group when started by torchrun; ``(rank, world_size)``."""
    if not launched():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def sum_values(values: dict[str, float]) -> dict[str, float]:
    """Element-wise sum over ranks of a dict of numbers (same keys on every rank)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (ranks may hold different numbers of rows)."""
    if not active():
        return tensor
    size = torch.tensor([tensor.shape[0]], dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype)
    padded[: tensor.shape[0]] = tensor.cpu()
    parts = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(s.item())] for part, s in zip(parts, sizes)]).to(tensor.device)


def broadcast_text(text: str) -> str:
    """Rank 0's string on every rank (sent as bytes: nothing is pickled)."""
    if not active():
        return text
    data = torch.tensor(list(text.encode()) if rank() == 0 else [], dtype=torch.uint8)
    length = torch.tensor([len(data)], dtype=torch.long)
    dist.broadcast(length, src=0)
    buffer = data if rank() == 0 else torch.zeros(int(length.item()), dtype=torch.uint8)
    dist.broadcast(buffer, src=0)
    return bytes(buffer.tolist()).decode()


def shutdown() -> None:
    if active():
        dist.barrier()
        dist.destroy_process_group()
