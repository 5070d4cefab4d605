"""torch.distributed helpers of the accumulators: sums across ranks and a common shift reference."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

Tensor = torch.Tensor
F64 = torch.float64


def dist_active() -> bool:
    """True when torch.distributed is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def dist_device(group: object | None) -> torch.device:
    """The device collectives of `group` need for tensors that have none yet (cuda for nccl, else cpu)."""
    if dist.get_backend(group) == "nccl":  # type: ignore[arg-type]
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensors: Iterable[Tensor], group: object | None = None) -> None:
    """Sum tensors in place across ranks, with one collective per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)  # type: ignore[arg-type]
        offset = 0
        for t in ts:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def common_reference(n: int, ref: Tensor, group: object | None) -> tuple[int, Tensor]:
    """Total count and token-weighted mean of all ranks' shift references (ranks without data add nothing)."""
    buf = torch.cat([torch.tensor([float(n)], dtype=F64, device=ref.device), n * ref.reshape(-1)])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)  # type: ignore[arg-type]
    total = round(buf[0].item())
    if total == 0:
        return 0, ref.clone()
    return total, (buf[1:] / buf[0]).view_as(ref)
