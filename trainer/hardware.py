"""Device, precision and process-group setup.

One process per device, launched by ``torchrun`` for multi-GPU or multi-node runs (it sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); a plain ``python`` run is a world of one. NCCL on CUDA,
gloo on CPU.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype; None: full fp32
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    @property
    def needs_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def setup_hardware(device: str = "auto", channels_last: bool | None = None) -> Hardware:
    """Pick the device; join the process group when launched by torchrun."""
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but no CUDA device is visible")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its kernels
        dev = torch.device("cuda", local_rank)
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dev, amp = torch.device("cpu"), None
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return Hardware(
        device=dev,
        amp_dtype=amp,
        # channels_last is faster on CUDA and on oneDNN CPUs alike (1.3-1.7x for a fine-tuning
        # step of EfficientNet-Lite0 here, docs/benchmarks.md).
        channels_last=True if channels_last is None else channels_last,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
    )


def loader_workers(hw: Hardware, requested: int | None = None, cpus: int | None = None) -> int:
    """DataLoader processes per rank: ``requested``, or one chosen for the host. On CPU the workers
    take cores from the training threads, so a small host decodes in the training process (0
    workers trained 1.4x faster than 2 on 2 cores, docs/benchmarks.md); a GPU host keeps its
    cores busy decoding."""
    if requested is not None:
        return requested
    if cpus is None:
        cpus = len(os.sched_getaffinity(0))
    per_rank = cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if hw.device.type == "cuda":
        return max(1, min(8, per_rank - 1))
    return 0 if per_rank <= 4 else 2


def teardown(hw: Hardware) -> None:
    if hw.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_across_ranks(values: torch.Tensor, hw: Hardware) -> torch.Tensor:
    """Element-wise sum over all ranks (identity in a world of one)."""
    if not hw.distributed:
        return values
    reduced = values.to(hw.device).clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device)


def distribute(module: torch.nn.Module, hw: Hardware) -> torch.nn.Module:
    """``module`` as stepped on this rank: DDP-wrapped across ranks. Wrap again whenever the set
    of trainable parameters changes (a new phase): DDP fixes it when it is built."""
    if not hw.distributed:
        return module
    device_ids = [hw.device.index] if hw.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def sync_buffers(module: torch.nn.Module, hw: Hardware) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) everywhere: DDP syncs them at the start of a
    forward, so after an epoch each rank still holds its own last update."""
    if hw.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def check_ranks_agree(module: torch.nn.Module, hw: Hardware) -> str:
    """SHA-256 of the weights, checked equal on every rank (raises if the ranks diverged)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    mine = digest.hexdigest()
    if hw.distributed:
        everyone: list = [None] * hw.world_size
        dist.all_gather_object(everyone, mine)
        if len(set(everyone)) != 1:
            raise RuntimeError(f"ranks hold different weights after training: {everyone}")
    return mine
