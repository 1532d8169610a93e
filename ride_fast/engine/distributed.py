"""Data-parallel training through PyTorch's own stack: torchrun, DistributedDataParallel, NCCL/gloo.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc_per_node=8 --max-restarts=3 \
        -m ride_fast train --config configs/imagenet_lt_resnet50_ride3.yaml --resume auto
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=8 --node-rank=$NODE_RANK \
        --max-restarts=3 --rdzv-backend=c10d --rdzv-endpoint=$HEAD_NODE:29500 --rdzv-id=ride \
        -m ride_fast train --config ... --resume auto

(README.md gives these lines; tests/engine/test_engine_elastic.py runs them: a rank killed mid-epoch
restarts the group, which resumes from last.pt.)

`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it the run is
a single process and nothing here does anything. Backends: NCCL when training on CUDA (one GPU per
process, cuda:LOCAL_RANK), gloo on the CPU.

The batch sizes of a recipe are global: each of N ranks loads data.batch_size / N images per step,
DDP averages the ranks' gradients, so a step sees the same images and the same learning rate
whatever N is; a class-weighted loss divides by the global batch's weight sum (`TrainStep`,
docs/method.md §8). With BatchNorm statistics per rank (the default, like the original) the result still
depends slightly on N; `train.sync_bn=true` computes them over the global batch (torch's
SyncBatchNorm on CUDA, `GlobalBatchNorm2d` below on the CPU, where torch's version does not run),
and then N processes follow one process's trajectory up to float rounding.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job. rank 0 logs and writes checkpoints."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    joined: bool = False  # in a process group (every torchrun job, one process included)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.joined

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """torchrun started this process (it sets TORCHELASTIC_RUN_ID): a job of one process joins a
    process group too, so `torchrun --nproc_per_node=1` runs DDP over NCCL like N processes do."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun set up (if any); returns (context, this rank's device).

    device: the resolved training device; "cuda" becomes cuda:LOCAL_RANK under torchrun.
    """
    if not launched_by_torchrun():
        return DistContext(), device
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPUs; "
                               "start at most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    **({"device_id": device} if device.type == "cuda" else {}))
        except RuntimeError as err:
            restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
            if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                raise RuntimeError(
                    f"rank {rank}, restart {restart}: the process group could not connect ({str(err).splitlines()[0]}). "
                    "After a restart, torchrun's shared rendezvous store can still hold the addresses of the processes "
                    "that died: launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ... (README.md, "
                    "\"Several GPUs, several nodes\")") from None
            raise
    return DistContext(rank, world, local, joined=True), device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, ctx: DistContext, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the job; a no-op in a single process."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=op)
    return tensor


def average_bn_statistics(model: nn.Module, ctx: DistContext) -> None:
    """Per-rank BatchNorm running statistics -> their mean over ranks, in place (a no-op in one process)."""
    if not ctx.enabled:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                all_reduce_(buf, ctx).div_(ctx.world_size)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole global batch, on any backend (gloo on
    the CPU included). Mean and variance are all-reduced with torch.distributed.nn's differentiable
    all_reduce, so the backward pass carries every rank's share of the gradient through the shared
    statistics, as torch's SyncBatchNorm does on CUDA. Outside distributed training (or in
    evaluation) it is an ordinary BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        C = x.shape[1]
        xf = x if x.dtype == torch.float64 else x.float()
        count = torch.tensor([x.numel() / C], dtype=xf.dtype, device=x.device)
        total = all_reduce(torch.cat([xf.sum((0, 2, 3)), count]))  # [C + 1]: per-channel sums, images x pixels
        n = total[C]
        mean = total[:C] / n
        centred = xf - mean.view(1, C, 1, 1)
        var = all_reduce(centred.square().sum((0, 2, 3))) / n  # biased, as BatchNorm normalises
        y = centred * torch.rsqrt(var + self.eps).view(1, C, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y.to(x.dtype)  # elementwise from x: keeps x's memory format (channels-last stays so)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of `model` computes global-batch statistics: torch's SyncBatchNorm on CUDA,
    GlobalBatchNorm2d elsewhere. Parameters and buffers are kept (the state dict is unchanged, so
    checkpoints load into the ordinary network); the converted model is for training (a batched
    model's ExpertBatchNorm2d loses its per-expert routed path)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_to_global(model)


def _convert_to_global(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):  # ExpertBatchNorm2d too
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                                device=module.weight.device if module.affine else None)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _convert_to_global(child))
    return module


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` (which stays the module whose state is saved)."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
    # broadcast_buffers=False: BatchNorm running stats stay per rank (rank 0's are saved), and no
    # extra broadcast per forward; gradient_as_bucket_view saves a copy of every gradient.
    return DistributedDataParallel(model, broadcast_buffers=False, gradient_as_bucket_view=True, **kwargs)


__all__ = [
    "DistContext",
    "GlobalBatchNorm2d",
    "all_reduce_",
    "convert_sync_batchnorm",
    "init_distributed",
    "launched_by_torchrun",
    "shutdown_distributed",
    "wrap_ddp",
]
