"""One small training loop shared by every method.

Every trainable detector in adlab writes a ``loss_fn(batch) -> loss`` for its
paper's objective and hands it, with :class:`RandomBatches` of its training images,
to :func:`train`, which adds what every method needs and nobody wants to rewrite: a
progress bar, seeding, atomic checkpoints (loaded with ``weights_only=True``), exact
resume, and a clear stop when the loss stops being a finite number::

    batches = RandomBatches(train_images, batch_size=8, seed=0)
    history = train(loss_fn, batches, steps=1000, optimizer=opt, modules={"net": net},
                    checkpoint="runs/net.pt")

Resume is exact: stopping after ``k`` steps and running ``train`` again (in a new process)
up to ``N`` gives bit-identical weights on CPU to one run of ``N`` steps, because the
checkpoint holds the weights, the optimiser, the scheduler, the batch order and position,
and the state of every random generator (PyTorch's, NumPy's and Python's).

The same loop runs on several processes when a launcher (``torchrun``, ``accelerate
launch``) started them: each takes its shard of every batch and the gradients are averaged
(:mod:`adlab.distributed`); only rank 0 shows the bar and writes checkpoints. ``precision``
chooses float32, bfloat16 autocast or CUDA float16 autocast with a gradient scaler.

Every gradient-trained detector splits its ``fit`` in two, so that ``fit``, the command
line (``python -m adlab train``) and the dry run share this one loop::

    run = detector.training_run(train_data)     # a TrainingRun: loss, batches, optimiser...
    run.history = train(run.loss_fn, run.batches, run.steps, run.optimizer, run.modules, ...)
    detector.finish_training(run)               # after the loop: maxima, templates, ...

:func:`train_detector` is those three lines.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from adlab import distributed
from adlab.config import remove_stale_temps, seed_everything, temp_path
from adlab.progress import progress as progress_bar

#: ``precision`` of :func:`train`: "32" float32; "bf16" autocast to bfloat16 (CPU and CUDA);
#: "16-mixed" autocast to float16 with a gradient scaler (CUDA only).
PRECISIONS = ("32", "bf16", "16-mixed")


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite."""


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model being trained (nothing was loaded)."""


class RandomBatches:
    """Random mini-batches of ``images`` forever; each epoch is a fresh permutation.

    Its own seeded ``torch.Generator`` draws the order, and :meth:`state_dict` holds that
    generator, the current epoch's order and the position in it, so a resumed run sees the
    very batches an uninterrupted one would.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int = 0):
        if len(images) == 0:
            raise ValueError("No training images: the training split is empty.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size}.")
        self.images, self.batch_size = images, int(batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(images), generator=self.generator)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.position >= len(self.images):  # the epoch is used up: a new permutation
            self.order = torch.randperm(len(self.images), generator=self.generator)
            self.position = 0
        batch = self.images[self.order[self.position:self.position + self.batch_size]]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order.clone(),
                "position": self.position, "batch_size": self.batch_size}

    def check_state_dict(self, state: dict) -> None:
        """Raise a CheckpointMismatchError if ``state`` was saved for other images."""
        if len(state["order"]) != len(self.images) or state["batch_size"] != self.batch_size:
            raise CheckpointMismatchError(
                f"The checkpoint's batches were drawn from {len(state['order'])} images in "
                f"batches of {state['batch_size']}; these are {len(self.images)} images in "
                f"batches of {self.batch_size}.")

    def load_state_dict(self, state: dict) -> None:
        self.check_state_dict(state)
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"].clone(), int(state["position"])


def holdout(images: torch.Tensor, fraction: float = 0.1,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split training images into ``(fit, validation)`` by a seeded random draw.

    The validation images choose checkpoints, thresholds and normalisation statistics:
    drawn from the *training* images (never the test set, which most official repos use),
    at random (never a sorted cut; real datasets are sorted by capture session). The same
    rule as ``load_dataset(..., split="val")``: :func:`adlab.data.mvtec.val_indices`.
    """
    from adlab.data.mvtec import val_indices

    val = val_indices(len(images), fraction, seed)
    keep = torch.ones(len(images), dtype=torch.bool)
    keep[val] = False
    return images[keep], images[val]


# --------------------------------------------------------------------------- the protocol

@dataclass
class TrainingRun:
    """What one detector's training needs, built by its ``training_run(train_data, steps)``.

    The arguments of :func:`train` (``loss_fn``, ``batches``, ``steps``, ``optimizer``,
    ``modules``, ``scheduler``, ``seed``, ``desc``); ``context``, a function returning the
    context manager the loop and ``finish_training`` run in (PyramidFlow: one CPU thread);
    ``extra``, whatever ``finish_training`` needs (validation images, ...); ``history``,
    the loss per step, filled in by the loop.
    """

    loss_fn: Callable[[object], torch.Tensor]
    batches: object
    steps: int
    optimizer: torch.optim.Optimizer
    modules: dict
    scheduler: object = None
    seed: int = 0
    desc: str = "train"
    context: Callable = contextlib.nullcontext
    extra: dict = field(default_factory=dict)
    history: list = field(default_factory=list)


def train_detector(detector, run: TrainingRun, progress: bool = True, **options):
    """Train ``detector`` through :func:`train`, then ``detector.finish_training(run)``.

    ``options`` go to :func:`train` (``checkpoint``, ``precision``, ...). Returns the detector.
    """
    with run.context():
        run.history = train(run.loss_fn, run.batches, run.steps, run.optimizer, run.modules,
                            scheduler=run.scheduler, seed=run.seed, desc=run.desc,
                            progress=progress, **options)
        detector.finish_training(run)
    return detector


def autocast(precision: str, device_type: str):
    """The context the loss is computed in for ``precision`` (see :data:`PRECISIONS`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    if precision == "16-mixed" and device_type != "cuda":
        raise ValueError("precision '16-mixed' (float16 with a gradient scaler) needs a CUDA GPU; "
                         f"on {device_type} use 'bf16' or '32'.")
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type, dtype=dtype)


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then
    ``os.replace``.

    A crash mid-write leaves the previous checkpoint intact, never a truncated file; the
    temporary file of a killed save is removed by the next save (see
    :func:`adlab.config.remove_stale_temps`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code is unpickled)."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or not a checkpoint
        raise ValueError(f"Could not load checkpoint {path}: {exc}. Delete it to start "
                         "training from scratch.") from exc


def _rng_state() -> dict:
    """Every global random generator a loss function may use (NumPy's as plain tensors and
    ints, which ``weights_only`` loading accepts)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_module(name: str, module: nn.Module, saved: dict, path) -> None:
    current = module.state_dict()
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"The checkpoint {path} does not fit module {name!r}: parameters missing from the "
            f"checkpoint {missing[:5]}, unexpected in it {unexpected[:5]}. Use the same model "
            "settings as when it was saved, or delete the checkpoint to train from scratch.")
    for key, value in current.items():
        if torch.is_tensor(value) and tuple(saved[key].shape) != tuple(value.shape):
            raise CheckpointMismatchError(
                f"The checkpoint {path} does not fit module {name!r}: parameter {key!r} is "
                f"{tuple(saved[key].shape)} in the checkpoint but {tuple(value.shape)} in the "
                "model. Use the same model settings as when it was saved, or delete the "
                "checkpoint to train from scratch.")


def _check_optimizer(optimizer: torch.optim.Optimizer, saved: dict, path) -> None:
    groups = optimizer.param_groups
    sizes, saved_sizes = [len(g["params"]) for g in groups], [len(g["params"])
                                                               for g in saved["param_groups"]]
    if sizes != saved_sizes:
        raise CheckpointMismatchError(
            f"The checkpoint {path} holds an optimiser over parameter groups of sizes "
            f"{saved_sizes}; this optimiser has {sizes}. Build the optimiser as when it was "
            "saved, or delete the checkpoint to train from scratch.")
    params = [p for g in groups for p in g["params"]]
    for index, entry in saved["state"].items():
        for key, value in entry.items():  # e.g. Adam's exp_avg: shaped like its parameter
            shape = tuple(params[int(index)].shape)
            if torch.is_tensor(value) and value.ndim == len(shape) > 0 \
                    and tuple(value.shape) != shape:
                raise CheckpointMismatchError(
                    f"The checkpoint {path} does not fit the optimiser: its {key!r} for parameter "
                    f"{index} is {tuple(value.shape)} but the parameter is {shape}. Delete the "
                    "checkpoint to train from scratch.")


CHECKPOINT_KEYS = ("step", "history", "rng", "batches", "modules", "optimizer")


def _check_checkpoint(state: dict, modules: dict, optimizer, scheduler, batches, path) -> None:
    """Raise a CheckpointMismatchError unless every part of ``state`` fits; load nothing."""
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointMismatchError(
            f"The checkpoint {path} lacks {', '.join(missing)} (written by another program or an "
            "older adlab). Delete it to train from scratch.")
    if set(state["modules"]) != set(modules):
        raise CheckpointMismatchError(
            f"The checkpoint {path} holds modules {sorted(state['modules'])}; training "
            f"{sorted(modules)}. Delete the checkpoint to train from scratch.")
    for name, module in modules.items():
        _check_module(name, module, state["modules"][name], path)
    _check_optimizer(optimizer, state["optimizer"], path)
    if (scheduler is None) != ("scheduler" not in state):
        raise CheckpointMismatchError(
            f"The checkpoint {path} was saved {'with' if 'scheduler' in state else 'without'} "
            "a learning-rate scheduler; pass the same, or delete the checkpoint.")
    if scheduler is not None and set(state["scheduler"]) != set(scheduler.state_dict()):
        raise CheckpointMismatchError(
            f"The checkpoint {path} holds another kind of scheduler ({sorted(state['scheduler'])})."
            " Pass the same scheduler, or delete the checkpoint.")
    if hasattr(batches, "check_state_dict"):
        batches.check_state_dict(state["batches"])


def _meta_difference(saved, meta: dict) -> str:
    """What differs between the ``meta`` of a checkpoint and of this run, for the message."""
    if not isinstance(saved, dict):
        return "it records no method: another program or an older adlab wrote it"
    diffs = [f"{key} {saved.get(key)!r} there, {meta.get(key)!r} here" for key in meta
             if key != "config" and saved.get(key) != meta.get(key)]
    old, new = saved.get("config") or {}, meta.get("config") or {}
    diffs += [f"{key} {old.get(key)!r} there, {new.get(key)!r} here"
              for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    return "; ".join(diffs[:4])


# --------------------------------------------------------------------------- the loop

def train(loss_fn: Callable[[object], torch.Tensor], batches: RandomBatches, steps: int,
          optimizer: torch.optim.Optimizer, modules: dict[str, nn.Module], *,
          scheduler=None, seed: int = 0, checkpoint: str | Path | None = None,
          checkpoint_every: int = 500, desc: str = "train", progress: bool = True,
          precision: str = "32", meta: dict | None = None) -> list[float]:
    """Minimise ``loss_fn`` for ``steps`` optimiser steps; return the loss history.

    ``batches`` yields the training batches: a :class:`RandomBatches` (with a ``checkpoint``,
    any iterator with ``state_dict`` and ``load_state_dict`` so a resume continues the same
    sequence; without, any iterable). ``modules`` names the networks whose weights are checkpointed (with the
    optimiser, the scheduler, the batches, the random generators and the loss history).
    When ``checkpoint`` exists, training resumes from its step, so an interrupted notebook
    cell continues where it stopped; a checkpoint that does not fit raises a
    :class:`CheckpointMismatchError` naming the module and parameter, and changes nothing.
    ``meta`` (e.g. the method and its settings) is stored in the checkpoint, and a resume
    from a checkpoint with other ``meta`` is refused the same way.

    ``precision``: "32", "bf16" or "16-mixed" (:data:`PRECISIONS`). Under ``torchrun`` /
    ``accelerate launch`` each process trains on its shard of every batch and the gradients
    are averaged (:mod:`adlab.distributed`); the history holds the mean loss over the
    processes, and only rank 0 shows the bar and writes the checkpoint.
    """
    if checkpoint is not None and not all(callable(getattr(batches, method, None))
                                          for method in ("state_dict", "load_state_dict")):
        raise TypeError("With a checkpoint, batches needs state_dict() and load_state_dict() so "
                        "training resumes exactly; use adlab.train.RandomBatches(images, "
                        "batch_size, seed).")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device_type = params[0].device.type if params else "cpu"
    amp = autocast(precision, device_type)  # checks precision before anything runs
    scaler = torch.amp.GradScaler(device_type) if precision == "16-mixed" else None
    distributed.setup()
    main = distributed.is_main()
    seed_everything(seed)
    history: list[float] = []
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint)
        if meta is not None and state.get("meta") != meta:
            raise CheckpointMismatchError(
                f"The checkpoint {checkpoint} belongs to another run "
                f"({_meta_difference(state.get('meta'), meta)}). Use the same settings, or "
                "delete the checkpoint to train from scratch.")
        _check_checkpoint(state, modules, optimizer, scheduler, batches, checkpoint)
        batches.load_state_dict(state["batches"])
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        history, start = list(state["history"]), int(state["step"])
        _set_rng_state(state["rng"])

    def snapshot(step: int) -> dict:
        state = {"step": step, "history": history, "rng": _rng_state(),
                 "batches": batches.state_dict(),
                 "modules": {n: m.state_dict() for n, m in modules.items()},
                 "optimizer": optimizer.state_dict()}
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if meta is not None:
            state["meta"] = meta
        return state

    for module in modules.values():
        module.train()
    batch_iter = iter(batches)
    bar = progress_bar(range(start, steps), desc=desc, initial=start, total=steps,
                       disable=not (progress and main))
    for step in bar:
        with amp:
            loss = loss_fn(distributed.shard(next(batch_iter)))
        value = distributed.mean_over_processes(float(loss.detach()))
        if not math.isfinite(value):
            bar.close()
            where = f" The last good checkpoint is {checkpoint}." if checkpoint else ""
            raise NonFiniteLossError(
                f"The {desc} loss became {value} at step {step}. Lower the learning rate, check "
                f"the inputs for NaN/inf, or use float32 instead of half precision.{where}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            distributed.average_gradients(params)
            optimizer.step()
        else:  # float16: scale the loss so small gradients do not round to 0
            scaler.scale(loss).backward()
            distributed.average_gradients(params)
            scaler.step(optimizer)  # unscales first; skips the step on inf / NaN gradients
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        history.append(value)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{value:.4g}")
        if checkpoint is not None and main and ((step + 1) % checkpoint_every == 0
                                                or step + 1 == steps):
            save_checkpoint(checkpoint, snapshot(step + 1))
    bar.close()
    for module in modules.values():
        module.eval()
    return history
