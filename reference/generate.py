"""One generation loop over a hyperschedule (paper §3.3-3.4, App. B.4, App. D).

At step ``t`` with ``(a, b) = sched.split(t)`` the active positions ``[a, b)`` move from levels
``τ_t`` to ``τ_{t+1}``; settled positions keep their tokens and worthless ones are never fed. Each
step of the ε family (``method="original"`` or ``"acs"``):

1. draws, per active position, whether it changes (``hk.sampling.acs_decisions``, stream 1): a masked
   position is unmasked with ``p_transfer = 1 - p_mask(τ_{t+1}) / p_mask(τ_t)`` (MDLM's ancestral
   step under the hyperschedule; 1 when the position reaches level 0), an unmasked non-frozen one is
   resampled with ``η·(1 - p_transfer)`` (ACS, §3.4; ``η = 0`` is the "original" sampler);
2. skips the model when nothing changes (MDLM's caching: without time conditioning the prediction of
   an unchanged state is unchanged, and the draws above do not depend on it); ``skip_unchanged=False``
   turns that off (MDLM without caching, for benchmarks): the model then runs on such a step too, with
   logits for every active non-prompt row, which are discarded (same tokens, more work);
3. runs the model on the fed cells, with logits only for the rows that change, and samples them with
   ``hk.sampling.gumbel_argmax`` (stream 0, FP64 Gumbel, MASK excluded).

With ``kv_cache=True`` the fed cells are only those not yet in the cache: the cells that settled
since the last call (re-encoded with their final tokens, in prefix mode) and the window, in one call
(DESIGN §7); the cache then advances to the settled prefix. Draws are keyed by absolute row identity
(``b·d + i``) and step, so cached and uncached generation sample identical tokens.

γ family (``method="analytic"`` or ``"euler"``, SEDD framework, App. B.4). The prior is all MASK:
the σ̄ → ∞ limit and stationary distribution of ``Q_Hybrid^γ`` (the official ``sample_limit``
mixes in uniform tokens at a hard-coded ``σ_max = 4`` instead). At step ``t`` every fed cell is
conditioned on the σ̄ of the token it holds, ``σ̄(τ_t/𝒯)`` through the noise schedule (settled and
prompt cells are clean: σ̄ = 0; SHIFTED's conditioning cell too). Each active, non-prompt position
then moves from ``σ̄(τ_t/𝒯)`` to ``σ̄(τ_{t+1}/𝒯)`` (exactly 0 at level 0) with
``hk.sampling.hybrid_step`` on its log-score ``gamma_log_score(logits, σ̄_now, x)``, ``final``
where ``τ_{t+1} = 0`` (MASK is then never drawn). Unlike the ε family, the model runs at every step
with something to sample: the network is conditioned on σ̄, which changes with every step even where
no token changed, and every active position may change at every step (there is no logit-free
"does this row change" draw), so no prediction can be reused. Settled cells are fed with σ̄ = 0 in
both the cached and the uncached path, so their cached keys/values are exactly what an uncached call
computes.

Special cases: γ = 0 on ``hk.schedules.flat`` (all positions at level 𝒯 - t) is SEDD's absorbing
diffusion with its analytic (τ-leaping) or Euler sampler; ε = 0 on ``flat`` with ``method="original"``
is MDLM's ancestral sampler (with MDLM's caching of unchanged states).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

import hdlm_kernels as hk
from hdlm_kernels.masks.inference import CONFIGS, CONTEXTS, WINDOWS, check_choice

__all__ = ["generate", "GenerationResult", "transfer_probability", "level_sigma", "EPSILON_METHODS",
           "GAMMA_METHODS"]

EPSILON_METHODS = ("original", "acs")
GAMMA_METHODS = ("analytic", "euler")


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


def level_sigma(noise, sched: hk.schedules.Hyperschedule, levels: torch.Tensor) -> torch.Tensor:
    """σ̄ of hyperschedule ``levels`` (integer tensor, any shape) as float64: ``σ̄(level/𝒯)``, exactly 0
    at level 0 (clean, even for a schedule with ``σ̄(0) > 0``). Computed as the training noise does
    (``hdlm_reference.losses``: float64 time, σ̄ stored in float32), so the model is conditioned on
    the very values it was trained on; the float32 value widened back is used everywhere (model
    input, score offset and the step's Δ)."""
    sigma, _ = noise(levels.to(torch.float64) / sched.num_levels)
    return torch.where(levels == 0, 0.0, sigma).to(torch.float32).to(torch.float64)


def generate(model, sched: hk.schedules.Hyperschedule, batch_size: int, seed: int, *, method: str = "acs",
             kv_cache: bool = False, prompt: torch.Tensor | None = None,
             prompt_lengths: torch.Tensor | None = None, temperature: float = 1.0,
             eta: float = 0.01, config: str = "aligned", context: str = "block_causal", window: str = "full",
             noise=None, bos_id: int | None = None, attention_backend: str | None = None,
             sampler_backend: str = "reference", device: torch.device | str | None = None,
             skip_unchanged: bool = True, progress: bool = False) -> GenerationResult:
    """Sample ``batch_size`` sequences of ``sched.length`` tokens (module docstring).

    Args:
        model: an ``hdlm_reference.DiT`` in eval mode: ε family for ``"original"``/``"acs"``, γ family
            (σ̄-conditioned, ``model.config.gamma`` is the process's γ) for ``"analytic"``/``"euler"``.
        sched: the hyperschedule (``hk.schedules.quench(d)`` gives autoregressive sampling).
        seed: int in [0, 2^64); with ``sched`` and the model, it fixes the output.
        method: ε family: ``"original"`` (MDLM ancestral) or ``"acs"`` (adaptive correction, with
            ``eta``); γ family: ``"analytic"`` (Tweedie τ-leaping) or ``"euler"``
            (``hk.sampling.hybrid_step``).
        temperature: of the ε methods' Gumbel-max draw; the γ methods need 1.0.
        kv_cache: cache the keys/values of settled cells; raises if that is not exact for
            ``(sched, config, context)`` (see ``hk.masks.kv_cacheable``).
        prompt: LongTensor [B or 1, P]: positions ``[0, P)`` are frozen to these tokens.
        prompt_lengths: LongTensor [B], prompts of different lengths: sequence ``b`` keeps only
            ``prompt[b, :prompt_lengths[b]]`` (each in ``[0, P]``); the rest of the row is padding and
            its positions are generated.
        config, context, window: as in ``hk.masks.inference``.
        noise: the σ̄ schedule (default ``hdlm_reference.noise.LogLinearNoise()``).
        bos_id: the conditioning token x̂^-1 for ``config="shifted"``.
        attention_backend: the attention backend of the model's calls (``hk.attention.DECODE_BACKENDS``;
            ``"cuda"`` needs ``kv_cache=True``);
            default: the model's own (``model.config.attention_backend``).
        sampler_backend: the ``gumbel_argmax`` backend of the draws: ``"reference"``, ``"kernels"`` (the
            fused kernel of the device, see ``hk.sampling.fused_backend``), ``"auto"`` or a named one;
            every backend draws the same tokens.
        skip_unchanged: skip the model call of a step where no row changes (MDLM's p(x0) caching,
            module docstring); False computes and discards that prediction (the tokens are the same).
        progress: show a tqdm bar over the steps (on stderr).

    Returns:
        :class:`GenerationResult` with ``tokens`` LongTensor [B, d] (never MASK).
    """
    from .losses import gamma_log_score
    from .noise import LogLinearNoise

    check_choice("method", method, EPSILON_METHODS + GAMMA_METHODS, "generate")
    check_choice("config", config, CONFIGS, "generate")
    check_choice("context", context, CONTEXTS, "generate")
    check_choice("window", window, WINDOWS, "generate")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"generate: batch_size must be an int >= 1, got {batch_size!r}")
    family = getattr(model.config, "family", "epsilon")
    gamma_family = method in GAMMA_METHODS
    if not gamma_family and family != "epsilon":
        raise ValueError(f"generate: method {method!r} samples ε-family models, got family {family!r} "
                         f"(use method='analytic' or 'euler')")
    if gamma_family and family != "gamma":
        raise ValueError(f"generate: method {method!r} samples γ-family models, got family {family!r} "
                         f"(use method='original' or 'acs')")
    if gamma_family and temperature != 1.0:
        raise ValueError(f"generate: temperature must be 1.0 for the γ methods (the step samples the "
                         f"reverse process itself), got {temperature!r}")
    gamma = float(model.config.gamma) if gamma_family else None
    if gamma_family and not 0.0 <= gamma <= 1.0:
        raise ValueError(f"generate: model.config.gamma must be in [0, 1] for the γ methods, got {gamma}")
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
    if prompt_lengths is not None and prompt is None:
        raise ValueError("generate: prompt_lengths needs a prompt")
    if prompt is not None:
        if prompt.dim() != 2 or prompt.shape[0] not in (1, B) or not 0 < prompt.shape[1] <= d:
            raise ValueError(f"generate: prompt must have shape [1 or {B}, P] with 0 < P <= {d}, "
                             f"got {tuple(prompt.shape)}")
        if int(prompt.min()) < 0 or int(prompt.max()) >= mask_id:
            raise ValueError(f"generate: prompt ids must be in [0, {mask_id}) (MASK excluded)")
        P = prompt.shape[1]
        keep = torch.ones(B, P, dtype=torch.bool)
        if prompt_lengths is not None:
            if (not isinstance(prompt_lengths, torch.Tensor) or prompt_lengths.dtype.is_floating_point
                    or prompt_lengths.dtype == torch.bool or prompt_lengths.shape != (B,)):
                raise ValueError(f"generate: prompt_lengths must be an integer tensor of shape [{B}], got "
                                 f"{prompt_lengths!r}")
            if int(prompt_lengths.min()) < 0 or int(prompt_lengths.max()) > P:
                raise ValueError(f"generate: prompt_lengths must lie in [0, P={P}], got {prompt_lengths.tolist()}")
            keep = torch.arange(P) < prompt_lengths.cpu()[:, None]
        keep = keep.to(device)
        x[:, :P] = torch.where(keep, prompt.to(device).expand(B, -1), mask_id)
        frozen[:, :P] = keep
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
        from tqdm import tqdm  # a declared dependency; imported here so that importing the module stays cheap

        for t in tqdm(range(sched.num_steps), desc="generate", unit="step", disable=not progress, leave=False):
            a, b = sched.split(t)
            if a == b:
                continue
            now, nxt = sched.table[t, a:b], sched.table[t + 1, a:b]
            if gamma_family:
                # Every active position may move; prompt positions are known and never sampled.
                change = ~frozen[:, a:b].cpu()
            else:
                p_transfer = transfer_probability(noise, sched, now, nxt).expand(B, -1)
                change = hk.sampling.acs_decisions(
                    x[:, a:b].reshape(-1).cpu(), p_transfer.reshape(-1), eta, mask_id, seed, t,
                    row_ids=row_ids[:, a:b].reshape(-1),
                    frozen=frozen[:, a:b].reshape(-1).cpu()).view(B, b - a)
            idle = not bool(change.any())
            if idle and skip_unchanged:
                continue
            start = int(cache.length.min()) if cache is not None else 0
            inputs = torch.cat([torch.full((B, 1), bos_id, device=device), x], 1) if shifted else x
            end = b + 1 if shifted else b
            mask = hk.masks.inference(sched, t, config, context, window).rows(slice(start, None)).to(device)
            wanted = torch.zeros(B, end - start, dtype=torch.bool)
            # cell a + j predicts position a + j in both configs; an idle step (skip_unchanged=False)
            # computes the prediction of every active non-prompt row, as uncached MDLM does
            wanted[:, a - start:b - start] = ~frozen[:, a:b].cpu() if idle else change
            positions = torch.arange(start, end, device=device).expand(B, -1)
            sigma = None
            if gamma_family:
                # σ̄ of the token each cell holds: τ_t of its position (0 for settled and prompt cells).
                held = torch.where(frozen.cpu(), 0, sched.table[t].expand(B, -1))
                held_sigma = level_sigma(noise, sched, held)
                if shifted:  # cell c holds position c - 1; cell 0 holds the clean conditioning token
                    held_sigma = torch.cat([torch.zeros(B, 1, dtype=torch.float64), held_sigma], 1)
                sigma = held_sigma[:, start:end].to(device=device, dtype=torch.float32)
            with _attention_backend(model, attention_backend):
                logits = model(inputs[:, start:end], positions, mask, sigma=sigma,
                               logits_rows=wanted.to(device), kv_cache=cache)
            calls, rows_fed = calls + 1, rows_fed + B * (end - start)
            logit_rows += int(wanted.sum())
            if idle:  # nothing to sample: the logits are discarded
                if cache is not None:
                    cache.length.fill_(a)
                continue
            chosen_ids = row_ids[:, a:b][change]
            window_tokens = x[:, a:b]
            if gamma_family:
                sigma_now = level_sigma(noise, sched, now).expand(B, -1)[change].to(device)
                sigma_next = level_sigma(noise, sched, nxt).expand(B, -1)[change].to(device)
                current = window_tokens[change.to(device)]
                log_score = gamma_log_score(logits.reshape(-1, V), sigma_now, current)
                tokens = hk.sampling.hybrid_step(
                    current, log_score, sigma_now, sigma_next, gamma, mask_id, seed, t,
                    row_ids=chosen_ids.to(device), method=method,
                    final=(nxt == 0).expand(B, -1)[change].to(device), backend=sampler_backend)
            else:
                tokens = hk.sampling.gumbel_argmax(logits.reshape(-1, V), seed, t, row_ids=chosen_ids,
                                                   temperature=temperature, exclude=mask_id,
                                                   backend=sampler_backend)
            window_tokens[change.to(device)] = tokens.to(device)
            if cache is not None:
                cache.length.fill_(a)  # cells [0, a) are settled: their keys/values are final
    return GenerationResult(x, calls, rows_fed, logit_rows, time.perf_counter() - started)


@contextlib.contextmanager
def _attention_backend(model, backend: str | None):
    """Run the enclosed model calls with ``backend`` (None: the model's own), then restore it."""
    if backend is None:
        yield
        return
    previous = model.config.attention_backend
    model.use_attention_backend(backend)
    try:
        yield
    finally:
        model.use_attention_backend(previous)
