"""One process or several (torchrun): the device, the process group and its checks, and each rank's random
streams and share of the data. Both trainers (train_baseline.py's loop, sbg.py's denoiser) run through it.
"""
import gc
import json
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from files import UserError


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def check_amp(amp, device):
    """Refuse bf16 on a GPU without bf16 arithmetic (compute capability < 8.0: V100, T4), where
    autocast would emulate it slowly or fail deep inside a kernel."""
    if amp == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"--amp bf16 needs a GPU with bf16 arithmetic (compute capability >= 8.0, e.g. A100, H100); "
                        f"{torch.cuda.get_device_name(device)} has {major}.{minor}: use --amp fp32")


def setup_distributed(args):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group:
    NCCL with one GPU per process (LOCAL_RANK), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        device = pick_device(args.device)
    else:
        use_cuda = args.device != "cpu" and torch.cuda.is_available()
        if args.device == "cuda" and not use_cuda:
            raise UserError("--device cuda asked for, but no CUDA device is available")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
    check_amp(getattr(args, "amp", "fp32"), device)
    if device.type == "cuda":  # fp32 on tensor cores (TF32) for matmuls too; PyTorch does it for convolutions already
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return (dist.get_rank() if world > 1 else 0), world, device


def check_same_settings(args, world):
    """Under torchrun: every rank resolved the same settings, or every rank stops with the same one line
    naming the first flag that differs (ranks with another --lr would train a silent mixture, another
    --epochs would hang in a collective)."""
    mine = {k: json.dumps(v, sort_keys=True, default=str) for k, v in vars(args).items()}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        differ = sorted(k for k in set(mine) | set(theirs) if everyone[0].get(k) != theirs.get(k))
        if differ:
            k = differ[0]
            dist.destroy_process_group()
            raise UserError(f"the processes were started with different settings: --{k.replace('_', '-')} is "
                            f"{everyone[0].get(k)} on rank 0 but {theirs.get(k)} on rank {rank}; start every "
                            "process with the same flags")


def random_streams(seed, rank):
    """(the data order: the same permutation on every rank, which takes its own shard; per-sample draws:
    one stream per rank). Both trainers' two generators, saved in their checkpoints for --resume."""
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed * 1000 + 1 + rank)


def wrap_for_ranks(model, world, device):
    """What training forwards go through: the DDP wrapper under torchrun, else the model itself."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model


def shard_batches(order_gen, n, rank, world, batch_size, drop_last):
    """This rank's batches of an epoch: one permutation of n, cut into equal shards (every rank takes as many
    steps), then into batches; drop_last drops a last partial batch."""
    order = torch.randperm(n, generator=order_gen)
    shard = order[: n - n % world][rank::world]
    return [b for b in shard.split(batch_size) if len(b) == batch_size or not drop_last]


def gather_states(generator, world):
    """Every rank's generator state (for the checkpoint: --resume restores each rank's own stream)."""
    states = [generator.get_state()]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, generator.get_state())
    return states


def leave_process_group(world):
    """Under torchrun, once the DDP wrapper is dropped: free it, so that the group is really gone before the
    interpreter shuts down (else gloo's threads can abort the process at exit), then leave the group."""
    if world > 1:
        gc.collect()
        dist.destroy_process_group()
