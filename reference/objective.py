"""Training objectives, the ``loss_fn(model, batch, step)`` the trainer calls (paper App. B.2-B.3, §3.2).

* ``PackedObjective``: tokens -> interval packing -> forward noise -> model -> Eq. 10 loss; every
  position is trained in one pass over ``2d`` cells (App. B.3).
* ``StepObjective``: the official style: one hyperschedule step per batch, the sequence noised at
  ``τ_t``; the settled prefix and the active window are fed (worthless positions never are), Eq. 10
  with Eq. 11 weights on the settled CE.

Their randomness (steps, intervals, forward noise) comes from a generator seeded by
``(seed, step, rank)``, so a resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

import hdlm_kernels as hk

from . import losses as L
from . import noise as N

__all__ = ["ObjectiveConfig", "PackedObjective", "StepObjective"]


@dataclass(frozen=True)
class ObjectiveConfig:
    """What is trained: the family's process, the hyperschedule and the packing layout.

    ``schedule`` is ``"block"`` or ``"slide"`` with ``width`` and ``levels`` (default ``width``);
    ``context`` defaults to block-causal for block schedules and causal for slide (the choices that
    KV-cache exactly). ``gamma`` is the γ-hybrid mixing weight, ``epsilon`` the ε-hybrid substitution
    probability; ``beta1``/``beta2`` weigh the settled CE and the diffusion term (Eq. 10).
    """

    family: str = "epsilon"
    schedule: str = "block"
    width: int = 16
    levels: int | None = None
    config: str = "aligned"
    context: str | None = None
    window: str = "full"
    gamma: float = 0.01
    epsilon: float = 0.01
    lam: float = 1.0
    beta1: float = 1.0
    beta2: float = 1.0
    bos_id: int | None = None

    def schedule_for(self, length: int) -> hk.schedules.Hyperschedule:
        if self.schedule not in ("block", "slide"):
            raise ValueError(f"ObjectiveConfig.schedule must be 'block' or 'slide', got {self.schedule!r}")
        levels = self.levels if self.levels is not None else self.width
        return getattr(hk.schedules, self.schedule)(length, self.width, levels)

    @property
    def attention_context(self) -> str:
        return self.context or ("block_causal" if self.schedule == "block" else "causal")

    def process(self, vocab_size: int):
        if self.family == "epsilon":
            return N.EpsilonHybrid(vocab_size, self.epsilon)
        if self.family == "gamma":
            return N.GammaHybrid(vocab_size, self.gamma)
        raise ValueError(f"ObjectiveConfig.family must be 'epsilon' or 'gamma', got {self.family!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class _SeededObjective:
    """Shared set-up: the schedule, the process, the σ̄ schedule and the per-step generator."""

    def __init__(self, objective: ObjectiveConfig, vocab_size: int, seq_len: int, seed: int = 0, noise=None):
        self.objective = objective
        self.sched = objective.schedule_for(seq_len)
        self.process = objective.process(vocab_size)
        self.noise = noise if noise is not None else N.LogLinearNoise()
        self.seed = seed

    def _generator(self, step: int) -> torch.Generator:
        """The CPU generator of the host-side draws (packing layout, the step of a StepObjective)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1009 + _rank())

    def _noise_stream(self, step: int) -> N.PhiloxStream:
        """The forward-noise draws: stream 2 keyed by (seed, rank) and the step, on the batch's device."""
        return N.PhiloxStream((self.seed * 1_000_003 + _rank()) % 2**64, step)


class PackedObjective(_SeededObjective):
    """``loss_fn(model, batch, step) -> (loss, metrics)`` for interval-packed training.

    Args:
        objective: the :class:`ObjectiveConfig`.
        vocab_size: ids including MASK (the model's ``vocab_size``).
        seq_len: the sequence length ``d`` of the batches.
        seed: base seed of the packing and noise draws.
        noise: σ̄ schedule (default ``LogLinearNoise()``).
    """

    def __call__(self, model, batch: torch.Tensor, step: int):
        o = self.objective
        generator = self._generator(step)
        packed = hk.packing.pack(batch.cpu(), self.sched, o.config, o.attention_context, o.window,
                                 generator=generator, bos_id=o.bos_id)
        device = batch.device
        packed_on_device = _to(packed, device)
        # The forward noise is drawn where the batch lives (one fused pass on a GPU).
        noised_on_device = L.noise_packed_batch(self.process, self.noise, packed_on_device, self._noise_stream(step),
                                                num_levels=self.sched.num_levels, config=o.config)
        sigma = noised_on_device.sigma_bar if o.family == "gamma" else None
        logits = model(noised_on_device.input_ids, packed_on_device.position_ids, packed.mask.to(device),
                       sigma=sigma)
        loss, metrics = L.packed_loss(self.process, logits, packed_on_device, noised_on_device, beta1=o.beta1,
                                      beta2=o.beta2, lam=o.lam)
        metrics.pop("loss", None)  # the trainer records the loss itself
        return loss, metrics


class StepObjective(_SeededObjective):
    """``loss_fn(model, batch, step) -> (loss, metrics)`` for per-step training (official style): one
    step ``t`` drawn uniformly for the whole batch, Eq. 10 with Eq. 11 block weights (ω = the schedule
    width) on the settled CE. Same arguments as :class:`PackedObjective`."""

    def __call__(self, model, batch: torch.Tensor, step: int):
        o = self.objective
        generator = self._generator(step)
        t = int(torch.randint(self.sched.num_steps, (1,), generator=generator))
        levels, settled, active = L.step_roles(self.sched, t)
        noised = L.noise_step(self.process, self.noise, batch.cpu(), levels, self._noise_stream(step),
                              num_levels=self.sched.num_levels, config=o.config, bos_id=o.bos_id)
        mask = hk.masks.inference(self.sched, t, o.config, o.attention_context, o.window)
        fed = mask.key_length  # settled prefix + window (SHIFTED: + the conditioning cell)
        device = batch.device
        B = batch.shape[0]
        positions = torch.arange(fed, device=device).expand(B, -1)
        sigma = noised.sigma_bar[:, :fed].to(device) if o.family == "gamma" else None
        fed_logits = model(noised.input_ids[:, :fed].to(device), positions, mask.to(device), sigma=sigma)
        # Worthless rows are never fed; they carry no loss, so zeros stand in for their logits.
        logits = fed_logits.new_zeros(B, noised.input_ids.shape[1], fed_logits.shape[-1])
        logits[:, :fed] = fed_logits
        loss, metrics = L.step_loss(self.process, logits, _to(noised, device), settled.to(device),
                                    active.to(device), beta1=o.beta1, beta2=o.beta2, lam=o.lam,
                                    block_width=self.sched.width)
        metrics.pop("loss", None)
        return loss, metrics


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _to(batch, device):
    # Move every tensor field of a (frozen) dataclass to the device; masks keep their own .to().
    import dataclasses

    fields = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        fields[f.name] = value.to(device) if isinstance(value, torch.Tensor) or hasattr(value, "key_length") else value
    return dataclasses.replace(batch, **fields)
