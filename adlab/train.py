"""One small training loop shared by every method.

Every trainable detector in adlab writes a ``loss_fn(batch) -> loss`` for its
paper's objective and hands it to :func:`train`, which adds what every
method needs and nobody wants to rewrite: a tqdm progress bar, seeding,
atomic checkpoints (loaded with ``weights_only=True``), resume, and a clear
stop when the loss stops being a finite number.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from adlab.config import seed_everything


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite."""


def random_batches(images: torch.Tensor, batch_size: int,
                   generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield random mini-batches of ``images`` forever (an epoch is a fresh permutation)."""
    if len(images) == 0:
        raise ValueError("No training images: the training split is empty.")
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            yield images[order[start:start + batch_size]]


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a temporary file, then ``os.replace``).

    A crash mid-write leaves the previous checkpoint intact, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code is unpickled)."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or not a checkpoint
        raise ValueError(f"Could not load checkpoint {path}: {exc}. Delete it to start "
                         "training from scratch.") from exc


def train(loss_fn: Callable[[object], torch.Tensor], batches: Iterable, steps: int,
          optimizer: torch.optim.Optimizer, modules: dict[str, nn.Module], *,
          scheduler=None, seed: int = 0, checkpoint: str | Path | None = None,
          checkpoint_every: int = 500, desc: str = "train", progress: bool = True) -> list[float]:
    """Minimise ``loss_fn`` for ``steps`` optimiser steps; return the loss history.

    ``modules`` names the networks whose weights are checkpointed (with the optimiser,
    the scheduler and the loss history). When ``checkpoint`` exists, training resumes
    from its step, so an interrupted notebook cell continues where it stopped.
    """
    seed_everything(seed)
    history: list[float] = []
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        history, start = list(state["history"]), int(state["step"])
        torch.set_rng_state(state["rng"])

    def snapshot(step: int) -> dict:
        state = {"step": step, "history": history, "rng": torch.get_rng_state(),
                 "modules": {n: m.state_dict() for n, m in modules.items()},
                 "optimizer": optimizer.state_dict()}
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        return state

    for module in modules.values():
        module.train()
    batch_iter = iter(batches)
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not progress)
    for step in bar:
        loss = loss_fn(next(batch_iter))
        value = float(loss.detach())
        if not math.isfinite(value):
            where = f" The last good checkpoint is {checkpoint}." if checkpoint else ""
            raise NonFiniteLossError(
                f"The {desc} loss became {value} at step {step}. Lower the learning rate, check "
                f"the inputs for NaN/inf, or use float32 instead of half precision.{where}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        history.append(value)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{value:.4g}")
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(checkpoint, snapshot(step + 1))
    for module in modules.values():
        module.eval()
    return history
