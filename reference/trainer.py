"""The training loop of the reference harness (docs/architecture.md, the reference harness; the official one: docs/official-code.md §8).

``train(model, loss_fn, data, config)`` runs AdamW with linear warmup + cosine decay, gradient clipping,
an exponential moving average (EMA) of the weights, bf16 autocast on CUDA, ``torchrun`` data parallelism,
a progress bar and a JSON-lines metrics log on rank 0, periodic atomic checkpoints, and resumes from the
newest checkpoint so that the continued run is bit-identical to an uninterrupted one.

The trainer knows nothing about diffusion: a *model* is any ``nn.Module``, and a *loss_fn* is a callable
``loss_fn(model, batch, step) -> (loss, metrics)`` where

* ``model`` is the module to call; under data parallelism it is the ``DistributedDataParallel`` wrapper
  (calling it is what synchronizes gradients), so reach the module's attributes with :func:`unwrap_model`;
  during evaluation it is the unwrapped module in ``eval()`` mode under ``torch.no_grad()``;
* ``batch`` is an int64 tensor ``[micro_batch, seq_len]`` of token ids on the training device (windows of
  the concatenated token stream, :mod:`hdlm_reference.data`);
* ``step`` is the 0-based index of the optimizer step being taken (the same for all micro-batches of a step);
* ``loss`` is a scalar tensor (mean over the micro-batch: gradients are averaged over micro-batches and
  ranks), and ``metrics`` a mapping ``name -> float or scalar tensor`` with the same names at every call
  and on every rank; they are averaged over the logging window and written to the log next to the loss.

Differences from the official loop (§8 of the notes), on purpose:

* ``step`` counts optimizer steps, not micro-batches, and the LR schedule advances once per optimizer step.
* The EMA is updated once per optimizer step, with decay ``min(ema_decay, (1 + t) / (10 + t))`` where ``t``
  is the number of EMA updates made before (diffusers' warmup formula as in the official run, without its
  ``update_after_step=2000`` delay): the average follows the weights closely early on, when they move
  fast, and becomes a long average later. Checkpoints hold the raw weights and the EMA separately.
* Weight decay applies to all trainable parameters (one parameter group; the notes record no exclusion of
  biases or norm weights in the official optimizer, so none is made here).

Output directory (``config.out_dir``):

* ``config.json``: the configuration of the run (written when it starts fresh; a resume keeps it);
* ``metrics.jsonl``: one JSON object per line. Training records: ``step`` (steps completed), ``loss`` and
  the loss_fn metrics (means over the micro-batches and ranks of the logging window), ``lr`` (of the last
  step), ``grad_norm`` (before clipping, mean over the window), ``tokens`` (seen so far), ``tokens_per_s``
  (over the window) and ``elapsed_s`` (since this call started). Evaluation records: ``step``,
  ``val_loss``, ``val_loss_ema``. ``{"event": "start" | "resume", ...}`` lines. After a resume a step may
  appear twice; the later line is the one of the continued run;
* ``checkpoints/``.

Checkpoint contents (one dict): ``format``, ``step``, ``model`` (raw state_dict), ``ema``, ``optimizer``,
``lr_scheduler``, ``sampler`` (the random-window sampler's position), ``ranks`` (per data-parallel rank:
its random states and partial metric window), ``world_size`` and ``config``.

Bit-identical resumption needs the same world size and deterministic kernels: on CPU that holds as is; on
CUDA set ``config.deterministic`` (and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` before CUDA starts). Resuming
with another world size continues the same data stream but reseeds the per-rank random states.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import (capture_rng_state, checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint,
                         load_newest_intact_checkpoint, restore_rng_state, save_checkpoint)
from .atomic_file import atomic_write
from .data import RandomWindowSampler, TokenDataset

__all__ = [
    "ExponentialMovingAverage",
    "LossFn",
    "TrainConfig",
    "TrainSummary",
    "lr_multiplier",
    "train",
    "unwrap_model",
]

CHECKPOINT_FORMAT = "hdlm_reference.trainer/1"

LossFn = Callable[[nn.Module, torch.Tensor, int], "tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]"]
"""``loss_fn(model, batch, step) -> (scalar loss tensor, metrics)``; see the module docstring."""

# The metric through which a loss_fn reports the positions the sync-free corruption rejected
# (hk.sampling.corrupt_deferred's `invalid`, summed): the trainer raises when a training record's mean is > 0,
# at the host synchronization it makes anyway to write the record (hdlm_reference.losses adds it).
CORRUPTION_METRIC = "invalid_corruption"

# names the trainer writes into training records; loss_fn metrics may not reuse them
_RESERVED_METRICS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "event",
                     "val_loss", "val_loss_ema")
# config fields that change the trajectory of a run; a resume that changes one is warned about
_TRAJECTORY_FIELDS = ("lr", "betas", "eps", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip",
                      "ema_decay", "batch_size", "seq_len", "grad_accum_steps", "seed", "bf16")


@dataclass
class TrainConfig:
    """Hyperparameters and bookkeeping of :func:`train`.

    Optimizer defaults are the official ε-family run's (AdamW lr 3e-4, betas (0.9, 0.95), weight decay
    0.1, clip 1.0, EMA 0.9999); sizes default to something a CPU can run. ``batch_size`` is *global*: the
    sequences of one optimizer step over all ranks and micro-batches (the paper's 512), so each rank's
    micro-batch holds ``batch_size / (world_size · grad_accum_steps)`` sequences.
    """

    # optimization
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1          # the cosine ends at lr · min_lr_ratio
    grad_clip: float | None = 1.0      # max global L2 norm; None: no clipping (the norm is still logged)
    ema_decay: float = 0.9999
    # data
    batch_size: int = 8
    seq_len: int = 128
    grad_accum_steps: int = 1
    # bookkeeping
    log_every: int = 10
    ckpt_every: int = 500              # a checkpoint is also written after the last step
    keep_checkpoints: int = 3
    eval_every: int = 0                # 0: no evaluation (needs val_data)
    eval_batches: int = 8
    out_dir: str = "runs/hdlm"
    seed: int = 0
    progress: bool = True              # tqdm bar on rank 0
    # hardware
    device: str = "auto"               # "auto": cuda:LOCAL_RANK when CUDA is available, else cpu
    bf16: bool = True                  # bf16 autocast of the forward and loss, on CUDA only
    deterministic: bool = False        # torch.use_deterministic_algorithms, for bit-exact CUDA resumes

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.out_dir = str(self.out_dir)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field outside its range."""
        _require(self.lr > 0, "lr", "> 0", self.lr)
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                 "two values in [0, 1)", self.betas)
        _require(self.eps > 0, "eps", "> 0", self.eps)
        _require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        _require(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "an int >= 0",
                 self.warmup_steps)
        _require(_is_int(self.total_steps) and self.total_steps >= 1, "total_steps", "an int >= 1",
                 self.total_steps)
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "> 0 or None", self.grad_clip)
        _require(0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)", self.ema_decay)
        for name in ("batch_size", "seq_len", "grad_accum_steps", "log_every", "ckpt_every",
                     "keep_checkpoints", "eval_batches"):
            _require(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an int >= 1",
                     getattr(self, name))
        _require(_is_int(self.eval_every) and self.eval_every >= 0, "eval_every", "an int >= 0",
                 self.eval_every)
        _require(_is_int(self.seed) and self.seed >= 0, "seed", "an int >= 0", self.seed)
        _require(self.batch_size % self.grad_accum_steps == 0, "batch_size",
                 f"a multiple of grad_accum_steps={self.grad_accum_steps}", self.batch_size)


@dataclass
class TrainSummary:
    """What :func:`train` returns (on every rank)."""

    step: int                      # optimizer steps completed
    start_step: int                # 0, or the step of the checkpoint this call resumed from
    resumed_from: str | None       # that checkpoint's path
    last_metrics: dict | None      # the last training record this call logged
    last_eval: dict | None         # the last evaluation record this call logged
    checkpoint: str | None         # the last checkpoint this call wrote
    metrics_path: str
    out_dir: str


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Factor of the peak lr for the optimizer step of index ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first step already moves,
    the last warmup step uses the peak), then a cosine from 1 at ``step = warmup_steps`` down to
    ``min_lr_ratio`` at ``step = total_steps``, held there afterwards.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class ExponentialMovingAverage:
    """EMA of a model's trainable parameters, kept in fp32 (fp64 parameters stay fp64).

    After the ``t``-th update (``t = 0, 1, ...``) ``shadow = d · shadow + (1 - d) · param`` with
    ``d = min(decay, (1 + t) / (10 + t))``. Buffers are not averaged; :meth:`model_state_dict` takes them
    from the model.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"ExponentialMovingAverage: decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: p.detach().to(_shadow_dtype(p.dtype), copy=True)
                       for name, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, p in self._parameters(model):
            self.shadow[name].lerp_(p.detach().to(self.shadow[name].dtype), weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trainable parameters with the average."""
        for name, p in self._parameters(model):
            p.copy_(self.shadow[name])

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model holds the averaged weights; its own are restored afterwards."""
        backup = {name: p.detach().clone() for name, p in self._parameters(model)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in self._parameters(model):
                    p.copy_(backup[name])

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averaged parameters (in the parameters' dtypes), e.g. to export
        EMA weights in the model's own layout."""
        state = model.state_dict()
        for name, value in self.shadow.items():
            state[name] = value.to(state[name].dtype).clone()
        return state

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        unexpected = sorted(set(state["shadow"]) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"ExponentialMovingAverage.load_state_dict: parameter names differ; missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        for name, value in state["shadow"].items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"ExponentialMovingAverage.load_state_dict: {name} has shape "
                                 f"{tuple(value.shape)}, expected {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])

    def _parameters(self, model: nn.Module):
        named = dict(model.named_parameters())
        for name in self.shadow:
            if name not in named:
                raise ValueError(f"ExponentialMovingAverage: the model has no parameter {name!r}")
            yield name, named[name]


def train(model: nn.Module, loss_fn: LossFn, data: TokenDataset | np.ndarray, config: TrainConfig,
          resume: bool = True, val_data: TokenDataset | np.ndarray | None = None) -> TrainSummary:
    """Train ``model`` on random windows of ``data`` until ``config.total_steps`` optimizer steps are done.

    Args:
        model: any ``nn.Module``; moved to the training device and trained in place (the raw weights; the
            EMA is in the checkpoints and in :class:`ExponentialMovingAverage` form there).
        loss_fn: ``loss_fn(model, batch, step) -> (loss, metrics)``, see the module docstring.
        data: training token stream, a :class:`TokenDataset` with ``seq_len == config.seq_len`` or a 1-D
            integer numpy array.
        config: :class:`TrainConfig`.
        resume: continue from the newest checkpoint in ``out_dir/checkpoints`` when there is one. With
            ``resume=False`` an ``out_dir`` that already holds checkpoints is refused (nothing is
            overwritten).
        val_data: validation stream for ``config.eval_every`` (fixed chunks, see
            :meth:`TokenDataset.chunk_batch`).

    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialized from the environment (NCCL on
    CUDA, gloo on CPU) unless the caller did it, and destroyed at the end if this call created it. Seeds
    the global random generators (``seed + rank``) when starting fresh; restores them when resuming.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train: config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    train_data = _as_dataset(data, config.seq_len, "data")
    val_dataset = _as_dataset(val_data, config.seq_len, "val_data") if val_data is not None else None
    if config.eval_every and val_dataset is None:
        raise ValueError(f"train: config.eval_every={config.eval_every} needs val_data, got None")
    from tqdm import tqdm  # a declared dependency; imported here so that importing the module stays cheap

    context = _DistributedContext.start(config.device)
    try:
        return _Run(model, loss_fn, train_data, val_dataset, config, context, resume, tqdm).run()
    finally:
        context.stop()


# --------------------------------------------------------------------------------------------------------
# data parallelism


@dataclass
class _DistributedContext:
    rank: int
    world_size: int
    device: torch.device
    created_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def start(cls, device_choice: str) -> _DistributedContext:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = _resolve_device(device_choice, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        created = False
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            created = True
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), device, created)
        return cls(0, 1, device, False)

    def stop(self) -> None:
        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()

    def broadcast_object(self, value):
        if not self.active:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_objects(self, value) -> list:
        if not self.active:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _resolve_device(choice: str, local_rank: int) -> torch.device:
    if choice == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(choice)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device: {choice!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


# --------------------------------------------------------------------------------------------------------
# the loop


class _Run:
    """One call of :func:`train`: the objects it builds and the loop over optimizer steps."""

    def __init__(self, model, loss_fn, train_data, val_data, config, context, resume, tqdm):
        self.loss_fn = loss_fn
        self.train_data = train_data
        self.val_data = val_data
        self.config = config
        self.ctx = context
        self.tqdm = tqdm
        self.device = context.device
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"

        world = context.world_size
        if config.batch_size % (world * config.grad_accum_steps):
            raise ValueError(f"TrainConfig.batch_size must be a multiple of world_size · grad_accum_steps = "
                             f"{world} · {config.grad_accum_steps}, got {config.batch_size}")
        if config.deterministic:
            torch.use_deterministic_algorithms(True)

        self.sampler = RandomWindowSampler(train_data, config.batch_size, config.seed, context.rank, world)
        self.raw_model = model.to(self.device)
        self.raw_model.train()
        self.resumed_from = self._find_resume_checkpoint(resume)
        state = load_checkpoint(self.resumed_from) if self.resumed_from else None
        if state is not None:
            self._check_checkpoint(state)
            self.raw_model.load_state_dict(state["model"])
        # DDP broadcasts rank 0's parameters and buffers, so every rank starts from the same weights
        self.model = (DistributedDataParallel(self.raw_model, device_ids=[self.device.index]
                                              if self.device.type == "cuda" else None)
                      if context.active else self.raw_model)
        self.parameters = [p for p in self.raw_model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("train: the model has no trainable parameter")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, betas=config.betas, eps=config.eps,
                                           weight_decay=config.weight_decay)

        def schedule(step: int) -> float:
            return lr_multiplier(step, config.warmup_steps, config.total_steps, config.min_lr_ratio)

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.ema = ExponentialMovingAverage(self.raw_model, config.ema_decay)
        self.window = _MetricWindow(self.device)
        self.step = 0
        if state is not None:
            self._restore(state)
        else:
            _seed_everything(config.seed + context.rank)
        self.start_step = self.step

    # ---- setup

    def _find_resume_checkpoint(self, resume: bool) -> Path | None:
        found = latest_checkpoint(self.checkpoint_dir) if self.ctx.is_main else None
        if found and not resume:
            raise ValueError(f"train: resume=False but {str(self.checkpoint_dir)!r} already holds "
                             f"checkpoints (newest {found}); resume, or choose another TrainConfig.out_dir")
        if found and self.ctx.is_main:
            found = self._newest_intact_checkpoint()
        found = self.ctx.broadcast_object(str(found) if found else None)
        return Path(found) if found else None

    def _newest_intact_checkpoint(self) -> Path:
        """The newest checkpoint that can be read. A newer unreadable one (a truncated copy, a failing
        disk) is named in a warning and renamed ``*.unreadable`` so that pruning never keeps it in place
        of a good one; nothing is deleted."""
        found = load_newest_intact_checkpoint(self.checkpoint_dir)  # warns about each unreadable one
        path = found[0]
        for step, newer in list_checkpoints(self.checkpoint_dir):
            if step > int(_checkpoint_step(path)):
                newer.rename(newer.with_name(newer.name + ".unreadable"))
        return path

    def _check_checkpoint(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"train: {self.resumed_from} has format {state.get('format')!r}, "
                             f"expected {CHECKPOINT_FORMAT!r}")
        saved = state["config"]
        changed = [f"{k}: {saved.get(k)!r} -> {getattr(self.config, k)!r}" for k in _TRAJECTORY_FIELDS
                   if _normalize(saved.get(k)) != _normalize(getattr(self.config, k))]
        if changed and self.ctx.is_main:
            warnings.warn(f"resuming {self.resumed_from} with a different configuration: "
                          + "; ".join(changed), stacklevel=3)

    def _restore(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.ema.load_state_dict(state["ema"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        if state["world_size"] == self.ctx.world_size:
            mine = state["ranks"][self.ctx.rank]
            restore_rng_state(mine["rng"])
            self.window.load_state_dict(mine["metric_window"])
        else:
            if self.ctx.is_main:
                warnings.warn(f"resuming a checkpoint of world size {state['world_size']} with world size "
                              f"{self.ctx.world_size}: random states reseeded, so the run is not "
                              f"bit-identical to an uninterrupted one", stacklevel=3)
            _seed_everything(self.config.seed + self.ctx.rank + 1_000_003 * self.step)

    # ---- loop

    def run(self) -> TrainSummary:
        config = self.config
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            config_path = self.out_dir / "config.json"
            if not config_path.exists() or self.resumed_from is None:  # a fresh start records its own
                _write_json_atomically(config_path, dataclasses.asdict(config))
            event = ({"event": "resume", "step": self.step, "checkpoint": str(self.resumed_from)}
                     if self.resumed_from else {"event": "start", "step": self.step})
            self._log({**event, "world_size": self.ctx.world_size, "time": time.time()})
        last_metrics = last_eval = None
        last_checkpoint = None
        progress = self.tqdm(total=config.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                             disable=not (self.ctx.is_main and config.progress))
        self.started = time.perf_counter()
        self.window.restart_clock()
        try:
            while self.step < config.total_steps:
                self._train_step()
                progress.update(1)
                if self.step % config.log_every == 0 or self.step == config.total_steps:
                    last_metrics = self._log_training_record()
                    progress.set_postfix(loss=f"{last_metrics['loss']:.4f}", lr=f"{last_metrics['lr']:.2e}")
                last_step = self.step == config.total_steps
                if config.eval_every and (self.step % config.eval_every == 0 or last_step):
                    last_eval = self._evaluate()
                if self.step % config.ckpt_every == 0 or self.step == config.total_steps:
                    last_checkpoint = self._save_checkpoint()
                if self.window.steps == 0:
                    self.window.restart_clock()  # tokens_per_s measures training, not evaluation or saving
        finally:
            progress.close()
        if last_checkpoint is None and self.resumed_from is not None:
            last_checkpoint = self.resumed_from
        self.ctx.barrier()
        return TrainSummary(step=self.step, start_step=self.start_step,
                            resumed_from=str(self.resumed_from) if self.resumed_from else None,
                            last_metrics=last_metrics, last_eval=last_eval,
                            checkpoint=str(last_checkpoint) if last_checkpoint else None,
                            metrics_path=str(self.metrics_path), out_dir=str(self.out_dir))

    def _train_step(self) -> None:
        config = self.config
        local_batch = next(self.sampler)
        micro_batches = local_batch.split(local_batch.shape[0] // config.grad_accum_steps)
        self.optimizer.zero_grad(set_to_none=True)
        for index, micro in enumerate(micro_batches):
            micro = self._to_device(micro)
            last = index == len(micro_batches) - 1
            # gradients are all-reduced only on the last micro-batch of the step
            sync = contextlib.nullcontext() if last or not self.ctx.active else self.model.no_sync()
            with sync:
                with self._autocast():
                    loss, metrics = self.loss_fn(self.model, micro, self.step)
                _check_loss(loss, metrics, self.step)
                (loss / config.grad_accum_steps).backward()
            self.window.add_micro_batch(loss, metrics)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.grad_clip or math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.ema.update(self.raw_model)
        self.step += 1
        self.window.add_step(grad_norm, lr, tokens=config.batch_size * config.seq_len)

    def _log_training_record(self) -> dict:
        values = self.window.reduce(self.ctx)
        tokens = self.step * self.config.batch_size * self.config.seq_len
        record = {"step": self.step, "loss": values.pop("loss"), "lr": values.pop("lr"),
                  "grad_norm": values.pop("grad_norm"), "tokens": tokens,
                  "tokens_per_s": values.pop("tokens_per_s"), "elapsed_s": time.perf_counter() - self.started,
                  **values}
        invalid = record.get(CORRUPTION_METRIC, 0.0)
        if isinstance(invalid, float) and invalid > 0:
            raise ValueError(f"train: the forward corruption (hk.sampling.corrupt_deferred) rejected positions in the "
                             f"logging window ending at step {self.step} (mean {invalid:g} per micro-batch): x0 ids "
                             f"outside [0, num_tokens) that are not MASK, or p_mask / p_shuffle outside [0, 1], NaN, "
                             f"or summing above 1; hk.sampling.corrupt on the same batch names the argument")
        bad = {k: v for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            raise FloatingPointError(f"train: non-finite training metrics at step {self.step}: {bad}")
        if self.ctx.is_main:
            self._log(record)
        return record

    @torch.no_grad()
    def _evaluate(self) -> dict:
        """Mean loss_fn loss over ``eval_batches`` fixed validation batches, with the raw and the EMA weights.

        The random state is saved and restored around the evaluation, so evaluating does not change the
        training run, and reseeded with ``config.seed + rank`` inside, so every evaluation (raw and EMA, at
        every step) draws the same noise and their losses are comparable.
        """
        config = self.config
        eval_batch_size = config.batch_size // config.grad_accum_steps
        model = self.raw_model
        record = {"step": self.step}
        saved_rng = capture_rng_state()
        model.eval()
        try:
            for name, weights in (("val_loss", contextlib.nullcontext()),
                                  ("val_loss_ema", self.ema.swapped_into(model))):
                _seed_everything(config.seed + self.ctx.rank)
                total = torch.zeros((), dtype=torch.float64, device=self.device)
                with weights:
                    for index in range(config.eval_batches):
                        batch = self.val_data.chunk_batch(index, eval_batch_size, self.ctx.rank,
                                                          self.ctx.world_size)
                        with self._autocast():
                            loss, _ = self.loss_fn(model, self._to_device(batch), self.step)
                        total += loss.detach().double()
                record[name] = (self.ctx.sum(total) / (config.eval_batches * self.ctx.world_size)).item()
        finally:
            model.train()
            restore_rng_state(saved_rng)
        if self.ctx.is_main:
            self._log(record)
        return record

    def _save_checkpoint(self) -> Path:
        ranks = self.ctx.gather_objects({"rng": capture_rng_state(),
                                         "metric_window": self.window.state_dict()})
        path = checkpoint_path(self.checkpoint_dir, self.step)
        if self.ctx.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "step": self.step,
                "model": self.raw_model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "ranks": ranks,
                "world_size": self.ctx.world_size,
                "config": dataclasses.asdict(self.config),
            }
            path = save_checkpoint(state, self.checkpoint_dir, self.step,
                                   keep_last=self.config.keep_checkpoints)
        return path

    # ---- helpers

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def _autocast(self):
        if self.device.type == "cuda" and self.config.bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _log(self, record: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class _MetricWindow:
    """Sums of the training metrics since the last training record, on the training device (no
    host synchronization per step), reduced over ranks when a record is written."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_batches = 0
        self.steps = 0
        self.tokens = 0
        self.lr = 0.0
        self.clock = time.perf_counter()

    def add_micro_batch(self, loss: torch.Tensor, metrics: Mapping) -> None:
        self._add("loss", loss)
        for name, value in metrics.items():
            self._add("metric/" + name, value)
        self.micro_batches += 1

    def add_step(self, grad_norm: torch.Tensor, lr: float, tokens: int) -> None:
        self._add("grad_norm", grad_norm)
        self.steps += 1
        self.tokens += tokens
        self.lr = lr

    def reduce(self, ctx: _DistributedContext) -> dict:
        """Window means over micro-batches (and ranks) or steps, then an empty window."""
        names = sorted(self.sums)
        totals = ctx.sum(torch.stack([self.sums[n] for n in names]))
        counts = [self.steps if n == "grad_norm" else self.micro_batches * ctx.world_size for n in names]
        means = {name.removeprefix("metric/"): (total / count).item()
                 for name, total, count in zip(names, totals, counts, strict=True)}
        elapsed = time.perf_counter() - self.clock
        means.update(lr=self.lr, tokens_per_s=self.tokens / elapsed if elapsed > 0 else 0.0)
        self.sums, self.micro_batches, self.steps, self.tokens = {}, 0, 0, 0
        self.restart_clock()
        return means

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def state_dict(self) -> dict:
        return {"sums": {n: v.cpu() for n, v in self.sums.items()}, "micro_batches": self.micro_batches,
                "steps": self.steps, "tokens": self.tokens, "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {n: v.to(self.device) for n, v in state["sums"].items()}
        self.micro_batches, self.steps = int(state["micro_batches"]), int(state["steps"])
        self.tokens, self.lr = int(state["tokens"]), float(state["lr"])

    def _add(self, name: str, value) -> None:
        value = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value,
                                dtype=torch.float64, device=self.device)
        if value.numel() != 1:
            raise ValueError(f"train: metric {name.removeprefix('metric/')!r} must be a scalar, "
                             f"got shape {tuple(value.shape)}")
        value = value.reshape(())
        self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()


def _check_loss(loss, metrics, step: int) -> None:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        given = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                 else type(loss).__name__)
        raise TypeError(f"loss_fn must return a scalar tensor as loss, got {given} at step {step}")
    if not isinstance(metrics, Mapping):
        raise TypeError(f"loss_fn must return a mapping of metrics, got {type(metrics).__name__} "
                        f"at step {step}")
    clashes = [name for name in metrics if name in _RESERVED_METRICS]
    if clashes:
        raise ValueError(f"loss_fn metric names {clashes} clash with the trainer's record fields "
                         f"{_RESERVED_METRICS}")


def _checkpoint_step(path: Path) -> int:
    return int(path.stem.split("_")[-1])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def _shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype == torch.float64 else torch.float32


def _as_dataset(data, seq_len: int, name: str) -> TokenDataset:
    if isinstance(data, TokenDataset):
        if data.seq_len != seq_len:
            raise ValueError(f"train: {name}.seq_len must equal config.seq_len={seq_len}, got {data.seq_len}")
        return data
    if isinstance(data, np.ndarray):
        return TokenDataset(data, seq_len)
    raise TypeError(f"train: {name} must be a TokenDataset or a 1-D numpy array of token ids, "
                    f"got {type(data).__name__}")


def _write_json_atomically(path: Path, value) -> None:
    with atomic_write(path) as f:
        f.write((json.dumps(value, indent=2) + "\n").encode("utf-8"))


def _normalize(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, name: str, expected: str, given) -> None:
    if not condition:
        raise ValueError(f"TrainConfig.{name} must be {expected}, got {given!r}")
