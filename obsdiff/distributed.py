"""Scale-out with torch.distributed, as launched by ``torchrun`` (NCCL on GPUs, gloo on CPU).

Per package: every rank calibrates its shard of the prompts, the α-weighted Σ 2XXᵀ and Σ α·B of
every Hessian are summed with one all-reduce each, each rank solves the layers it owns
(layer i → rank i mod world) and broadcasts the result, so every rank ends with the same model.
Only rank 0 writes. Communication per package: Σ_layers (cols² + 1) floats all-reduced (the Hessians,
shared ones once) plus the pruned weights broadcast once each.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list, batch_size: int) -> tuple[list, list[int]]:
        """This rank's items and their global indices, by whole batches of the single-process run.

        Batch b goes to rank b mod world, so every batch is computed exactly as a single process would
        (same shapes, same kernels) and only the order of the Hessian sum differs.
        """
        batches = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
        ids = [i for b in batches[self.rank :: self.size] for i in b]
        return [items[i] for i in ids], ids

    def owner(self, index: int) -> int:
        return index % self.size


def init_world(device: str | None = None) -> World:
    """Join the process group torchrun set up (WORLD_SIZE > 1); a single process needs nothing.

    NCCL only when this rank's tensors live on a GPU (it cannot reduce CPU tensors: ``--device cpu`` on a CUDA machine
    uses gloo), and then each rank first binds its own GPU (``LOCAL_RANK``), or NCCL would put every rank on GPU 0."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if on_gpu:
        torch.cuda.set_device(device_for(World(), device))
    if not dist.is_initialized():
        backend = "nccl" if on_gpu else "gloo"
        timeout = timedelta(seconds=int(os.environ.get("OBSDIFF_DIST_TIMEOUT", "600")))
        dist.init_process_group(backend, timeout=timeout)
    world = World(dist.get_rank(), dist.get_world_size())
    log.info("rank %d of %d (%s)", world.rank, world.size, dist.get_backend())
    return world


def device_for(world: World, requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_reduce_hessians(world: World, accumulators: dict) -> None:
    """Sum every rank's un-normalised statistic; afterwards all ranks hold the same Hessians."""
    if not world.active:
        return
    import torch.distributed as dist

    for name in sorted(accumulators):
        acc = accumulators[name]  # still the raw sum: accumulators are normalised once, after this
        weight = torch.tensor([acc.weight_sum, acc.rows, acc.kept], dtype=torch.float64, device=acc.hessian.device)
        dist.all_reduce(acc.hessian)
        dist.all_reduce(weight)
        acc.weight_sum, acc.rows, acc.kept = float(weight[0].item()), int(weight[1].item()), int(weight[2].item())


def broadcast_layer(world: World, module: torch.nn.Module, record: dict | None, src: int) -> dict:
    """The owner's solved weight and its record, to every rank."""
    if not world.active:
        return record
    import torch.distributed as dist

    dist.broadcast(module.weight.data, src=src)
    box = [record]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        dist.barrier()


def shutdown(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
