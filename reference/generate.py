"""One generation loop over a hyperschedule (paper §3.3-3.4, App. B.4, App. D).

At step ``t`` with ``(a, b) = sched.split(t)`` the active positions ``[a, b)`` move from levels
``τ_t`` to ``τ_{t+1}``; settled positions keep their tokens and worthless ones are never fed. Each
step:

1. draws, per active position, whether it changes (``hk.sampling.acs_decisions``, stream 1): a masked
   position is unmasked with ``p_transfer = 1 - p_mask(τ_{t+1}) / p_mask(τ_t)`` (MDLM's ancestral
   step under the hyperschedule; 1 when the position reaches level 0), an unmasked non-frozen one is
   resampled with ``η·(1 - p_transfer)`` (ACS, §3.4; ``η = 0`` is the "original" sampler);
2. skips the model when nothing changes (MDLM's caching: without time conditioning the prediction of
   an unchanged state is unchanged, and the draws above do not depend on it);
3. runs the model on the fed cells, with logits only for the rows that change, and samples them with
   ``hk.sampling.gumbel_argmax`` (stream 0, FP64 Gumbel, MASK excluded).

With ``kv_cache=True`` the fed cells are only those not yet in the cache: the cells that settled
since the last call (re-encoded with their final tokens, in prefix mode) and the window, in one call
(DESIGN §7); the cache then advances to the settled prefix. Draws are keyed by absolute row identity
(``b·d + i``) and step, so cached and uncached generation sample identical tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import hdlm_kernels as hk
from hdlm_kernels.masks.inference import CONFIGS, CONTEXTS, WINDOWS, check_choice

__all__ = ["generate", "GenerationResult", "transfer_probability"]


@dataclass(frozen=True)
class GenerationResult:
    """``tokens``: LongTensor [B, d]. Counters: model calls, query rows fed to the model and rows
    for which logits were computed, summed over calls; wall-clock seconds."""

    tokens: torch.Tensor
    model_calls: int
    rows_fed: int
    logit_rows: int
    seconds: float

    def tokens_per_second(self) -> float:
        return self.tokens.numel() / max(self.seconds, 1e-12)


def transfer_probability(noise, sched: hk.schedules.Hyperschedule, levels_now: torch.Tensor,
                         levels_next: torch.Tensor) -> torch.Tensor:
    """Probability that a masked position at level ``levels_now`` is unmasked when the schedule moves
    it to ``levels_next``: ``1 - p_mask(t_next) / p_mask(t_now)`` with ``p_mask = 1 - e^{-σ̄(t)}``,
    ``t = level / 𝒯`` (MDLM's reverse step); exactly 1 at level 0 and 0 where the level stays."""
    sigma_now, _ = noise(sched.noise_time(levels_now).double())
    sigma_next, _ = noise(sched.noise_time(levels_next).double())
    p_now, p_next = -torch.expm1(-sigma_now), -torch.expm1(-sigma_next)
    moving = levels_next < levels_now
    p = torch.where(moving, 1 - p_next / p_now.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return torch.where(levels_next == 0, 1.0, p).clamp(0.0, 1.0)


def generate(model, sched: hk.schedules.Hyperschedule, batch_size: int, seed: int, *, method: str = "acs",
             kv_cache: bool = False, prompt: torch.Tensor | None = None, temperature: float = 1.0,
             eta: float = 0.01, config: str = "aligned", context: str = "block_causal", window: str = "full",
             noise=None, bos_id: int | None = None, sampler_backend: str = "reference",
             device: torch.device | str | None = None) -> GenerationResult:
    """Sample ``batch_size`` sequences of ``sched.length`` tokens from an ε-family model.

    Args:
        model: an ``hdlm_reference.DiT`` (ε family: no σ conditioning) in eval mode.
        sched: the hyperschedule (``hk.schedules.quench(d)`` gives autoregressive sampling).
        seed: int in [0, 2^64); with ``sched`` and the model, it fixes the output.
        method: ``"original"`` (MDLM ancestral) or ``"acs"`` (adaptive correction, with ``eta``).
        kv_cache: cache the keys/values of settled cells; raises if that is not exact for
            ``(sched, config, context)`` (see ``hk.masks.kv_cacheable``).
        prompt: LongTensor [B or 1, P]: positions ``[0, P)`` are frozen to these tokens.
        config, context, window: as in ``hk.masks.inference``.
        noise: the σ̄ schedule (default ``hdlm_reference.noise.LogLinearNoise()``).
        bos_id: the conditioning token x̂^-1 for ``config="shifted"``.
    """
    from .noise import LogLinearNoise

    check_choice("method", method, ("original", "acs"), "generate")
    check_choice("config", config, CONFIGS, "generate")
    check_choice("context", context, CONTEXTS, "generate")
    check_choice("window", window, WINDOWS, "generate")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"generate: batch_size must be an int >= 1, got {batch_size!r}")
    if getattr(model.config, "family", "epsilon") != "epsilon":
        raise ValueError(f"generate: method {method!r} samples ε-family models, got family {model.config.family!r}")
    shifted = config == "shifted"
    if shifted and (isinstance(bos_id, bool) or not isinstance(bos_id, int)):
        raise ValueError(f"generate: config='shifted' needs bos_id, got {bos_id!r}")
    if kv_cache and not hk.masks.kv_cacheable(sched, config, context):
        raise ValueError(f"generate: kv_cache=True is not exact for a {sched.kind} schedule with config={config!r} "
                         f"and context={context!r} (settled rows would change); use kv_cache=False or "
                         "context='causal'")
    if sched.length > model.config.max_length:
        raise ValueError(f"generate: sched.length {sched.length} exceeds the model's max_length "
                         f"{model.config.max_length}")
    noise = LogLinearNoise() if noise is None else noise
    eta = eta if method == "acs" else 0.0
    device = torch.device(device) if device is not None else next(model.parameters()).device
    B, d, V = batch_size, sched.length, model.config.vocab_size
    mask_id = V - 1

    x = torch.full((B, d), mask_id, dtype=torch.long, device=device)
    frozen = torch.zeros(B, d, dtype=torch.bool, device=device)
    if prompt is not None:
        if prompt.dim() != 2 or prompt.shape[0] not in (1, B) or not 0 < prompt.shape[1] <= d:
            raise ValueError(f"generate: prompt must have shape [1 or {B}, P] with 0 < P <= {d}, "
                             f"got {tuple(prompt.shape)}")
        if int(prompt.min()) < 0 or int(prompt.max()) >= mask_id:
            raise ValueError(f"generate: prompt ids must be in [0, {mask_id}) (MASK excluded)")
        x[:, :prompt.shape[1]] = prompt.to(device)
        frozen[:, :prompt.shape[1]] = True
    row_ids = (torch.arange(B, device=device)[:, None] * d + torch.arange(d, device=device)).cpu()

    cells = d + 1 if shifted else d
    cache = None
    if kv_cache:
        cfg = model.config
        cache = hk.KVCache(cfg.num_layers, B, cells, cfg.num_heads, cfg.hidden_size // cfg.num_heads,
                           next(model.parameters()).dtype, device)
    calls = rows_fed = logit_rows = 0
    started = time.perf_counter()
    with torch.no_grad():
        for t in range(sched.num_steps):
            a, b = sched.split(t)
            if a == b:
                continue
            now, nxt = sched.table[t, a:b], sched.table[t + 1, a:b]
            p_transfer = transfer_probability(noise, sched, now, nxt).expand(B, -1)
            change = hk.sampling.acs_decisions(
                x[:, a:b].reshape(-1).cpu(), p_transfer.reshape(-1), eta, mask_id, seed, t,
                row_ids=row_ids[:, a:b].reshape(-1), frozen=frozen[:, a:b].reshape(-1).cpu()).view(B, b - a)
            if not bool(change.any()):
                continue
            start = int(cache.length.min()) if cache is not None else 0
            inputs = torch.cat([torch.full((B, 1), bos_id, device=device), x], 1) if shifted else x
            end = b + 1 if shifted else b
            mask = hk.masks.inference(sched, t, config, context, window).rows(slice(start, None)).to(device)
            wanted = torch.zeros(B, end - start, dtype=torch.bool)
            wanted[:, a - start:b - start] = change  # cell a + j predicts position a + j in both configs
            positions = torch.arange(start, end, device=device).expand(B, -1)
            logits = model(inputs[:, start:end], positions, mask, logits_rows=wanted.to(device), kv_cache=cache)
            calls, rows_fed, logit_rows = calls + 1, rows_fed + B * (end - start), logit_rows + int(wanted.sum())
            chosen_ids = row_ids[:, a:b][change]
            tokens = hk.sampling.gumbel_argmax(logits.reshape(-1, V), seed, t, row_ids=chosen_ids,
                                               temperature=temperature, exclude=mask_id, backend=sampler_backend)
            window_tokens = x[:, a:b]
            window_tokens[change.to(device)] = tokens.to(device)
            if cache is not None:
                cache.length.fill_(a)  # cells [0, a) are settled: their keys/values are final
    return GenerationResult(x, calls, rows_fed, logit_rows, time.perf_counter() - started)
