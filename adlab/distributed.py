"""Several processes (GPUs or machines) training one model: data parallelism by hand.

``torchrun --nproc_per_node K`` and ``accelerate launch`` start K copies of the same
command and tell each one who it is through environment variables: ``WORLD_SIZE`` (K),
``RANK`` (0 .. K-1), ``LOCAL_RANK`` (its GPU on this machine), ``MASTER_ADDR`` and
``MASTER_PORT`` (where the processes meet). :func:`setup` reads them and joins the group
(``gloo`` on CPU, ``nccl`` on GPUs); without them it does nothing, so a single-process run
needs nothing extra.

Each training step then works as DistributedDataParallel (DDP) does:

1. every process draws the *same* batch (same seed, same batch order), and keeps its own
   shard of it, ``batch[rank::world]`` (:func:`shard`);
2. every process computes the loss of its shard and ``backward()``;
3. the gradients are averaged over the processes with ``all_reduce``
   (:func:`average_gradients`), so every process takes the same optimiser step and the
   weights stay identical everywhere.

When the loss is a mean over the samples of the batch and the shards are the same size,
the averaged gradient *is* the gradient of the whole batch: K processes with batch B
train exactly as one process with batch K B (``tests/test_distributed.py`` checks it).

Why by hand rather than wrapping the networks in ``torch.nn.parallel.DistributedDataParallel``:
DDP averages the gradients of the modules it wraps during their ``backward``, so the loss
must come from calling the wrapper. adlab's loss functions call their own modules (a list
of decoders, a flow and a frozen backbone, a template...), and a wrapper would have to
be threaded through every detector. One ``all_reduce`` per parameter after ``backward``
is the same arithmetic, in six lines, for any loss function. (DDP also overlaps the
communication with the backward pass; that speed is what we give up.)
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    """How many processes train together (1 when not launched by torchrun / accelerate)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's number, 0 .. world_size() - 1 (0 when alone)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def is_main() -> bool:
    """True in the one process that shows progress and writes files (rank 0)."""
    return rank() == 0


def setup() -> bool:
    """Join the process group when a launcher started several processes; True if distributed.

    Safe to call more than once. On CUDA each process takes GPU ``LOCAL_RANK`` (call this
    before building models, so :func:`adlab.config.device` finds that GPU).
    """
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and os.environ.get("ADLAB_DEVICE", "cuda") != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return True


def shard(batch):
    """This process's part of a batch: ``batch[rank::world]`` for a tensor, element-wise for a
    tuple or list (anything else, such as a layer index, is the same for every process)."""
    k = world_size()
    if k == 1:
        return batch
    if torch.is_tensor(batch) and batch.ndim > 0:
        if len(batch) < k:
            raise ValueError(f"A batch of {len(batch)} cannot be split over {k} processes; use a "
                             f"batch size of at least {k} (ideally a multiple of it).")
        return batch[rank()::k]
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(part) for part in batch)
    return batch


def average_gradients(params) -> None:
    """Replace each gradient by its mean over the processes (what DDP does after backward).

    Every process must have gradients for the same parameters (true here: all draw the same
    batch, so the same parts of the model are used).
    """
    k = world_size()
    if k == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= k


def mean_over_processes(value: float) -> float:
    """The mean of a number over the processes (the loss shown and recorded)."""
    k = world_size()
    if k == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / k


def barrier() -> None:
    """Wait until every process gets here (e.g. rank 0 finished writing a file)."""
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (at the end of a distributed command)."""
    if dist.is_initialized():
        dist.destroy_process_group()
