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
(docs/architecture.md, generation data flow); the cache then advances to the settled prefix. Draws are keyed by absolute row identity
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
That is the ``"paper"`` conditioning; ``conditioning="official"`` feeds the σ̄ the official sampler
feeds instead (the published checkpoints, :mod:`hdlm_reference.conditioning`).

Special cases: γ = 0 on ``hk.schedules.flat`` (all positions at level 𝒯 - t) is SEDD's absorbing
diffusion with its analytic (τ-leaping) or Euler sampler; ε = 0 on ``flat`` with ``method="original"``
is MDLM's ancestral sampler (with MDLM's caching of unchanged states).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass

import torch

import hdlm_kernels as hk
from hdlm_kernels.masks.inference import CONFIGS, CONTEXTS, WINDOWS, check_choice

from .step_graphs import StepGraphs, capture_cuda_graph

# How cuda_graphs=True captures on each device type (tests add the CPU twin, capture_by_rerunning).
_GRAPH_CAPTURE = {"cuda": capture_cuda_graph}

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
    input, score offset and the step's Δ). The ``"paper"`` conditioning's table
    (:func:`hdlm_reference.conditioning.sigma_table`)."""
    from .conditioning import sigma_table

    return sigma_table("paper", noise, sched.num_levels).active[levels]


def generate(model, sched: hk.schedules.Hyperschedule, batch_size: int, seed: int, *, method: str = "acs",
             kv_cache: bool = False, prompt: torch.Tensor | None = None,
             prompt_lengths: torch.Tensor | None = None, temperature: float = 1.0,
             eta: float = 0.01, config: str = "aligned", context: str = "block_causal", window: str = "full",
             noise=None, conditioning: str | None = None, bos_id: int | None = None,
             attention_backend: str | None = None,
             sampler_backend: str = "auto", device: torch.device | str | None = None,
             skip_unchanged: bool = True, progress: bool = False, cuda_graphs: bool = False) -> GenerationResult:
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
        noise: the σ̄ schedule (default: the model's recorded ``model.noise`` when it has one, as
            :func:`hdlm_reference.load_pretrained` records for official checkpoints, else
            ``hdlm_reference.noise.LogLinearNoise()``).
        conditioning: the σ̄ a γ model is fed per cell, ``"paper"`` or ``"official"``
            (:mod:`hdlm_reference.conditioning`); default: the model's recorded ``model.conditioning``
            when it has one, else ``"paper"``. No effect on the ε family.
        bos_id: the conditioning token x̂^-1 for ``config="shifted"``.
        attention_backend: the backend of the model's attention calls: with ``kv_cache=True`` a name of
            ``hk.backends.names("decode")`` (the calls are ``decode`` calls; ``"cuda"`` included),
            else of ``hk.backends.names("attention")``; default: the model's own
            (``model.config.decode_backend`` / ``attention_backend``).
        sampler_backend: the backend of the draws, a name of ``hk.backends.names("gumbel_argmax")``
            (ε methods) or ``names("hybrid_step")`` (γ methods): ``"auto"`` (default: the fused
            kernel of the device when there is one, else the reference), ``"kernels"`` (insist on
            it), ``"reference"`` or a named one; every backend draws the same tokens.
        skip_unchanged: skip the model call of a step where no row changes (MDLM's p(x0) caching,
            module docstring); False computes and discards that prediction (the tokens are the same).
        progress: show a tqdm bar over the steps (on stderr).
        cuda_graphs: capture the per-step forward as CUDA graphs and replay them for the later steps
            with the same shapes and mask (``hdlm_reference.step_graphs``; e.g. the steps inside one
            block of τ_Block with a KV cache); CUDA only. Same tokens as without.

    Returns:
        :class:`GenerationResult` with ``tokens`` LongTensor [B, d] (never MASK).
    """
    from .conditioning import check_conditioning, sigma_table
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
    if attention_backend is not None:
        hk.backends.check_name("decode" if kv_cache else "attention", attention_backend,
                               f"generate(kv_cache={kv_cache}).attention_backend")
    hk.backends.check_name("hybrid_step" if method in GAMMA_METHODS else "gumbel_argmax", sampler_backend,
                           "generate.sampler_backend")
    if kv_cache and not hk.masks.kv_cacheable(sched, config, context):
        raise ValueError(f"generate: kv_cache=True is not exact for a {sched.kind} schedule with config={config!r} "
                         f"and context={context!r} (settled rows would change); use kv_cache=False or "
                         "context='causal'")
    if sched.length > model.config.max_length:
        raise ValueError(f"generate: sched.length {sched.length} exceeds the model's max_length "
                         f"{model.config.max_length}")
    if conditioning is None:
        conditioning = getattr(model, "conditioning", "paper")
    check_conditioning(conditioning, "generate")
    if noise is None:
        noise = getattr(model, "noise", None) or LogLinearNoise()
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
    capture = None
    if cuda_graphs:
        capture = _GRAPH_CAPTURE.get(device.type)
        if capture is None:
            raise ValueError(f"generate: cuda_graphs=True needs a CUDA device; got {device}")
    started = time.perf_counter()  # planning is part of the generation's time
    sigmas = sigma_table(conditioning, noise, sched.num_levels) if gamma_family else None
    plan = _plan_steps(sched, B, seed, method, eta, frozen.cpu(), noise, sigmas, mask_id, config, context,
                       window, kv_cache, skip_unchanged, device)
    graphs = StepGraphs(Counter(step.key for step in plan.steps), capture) if capture is not None else None
    cache = None
    if kv_cache:
        cfg = model.config
        cache = hk.KVCache(cfg.num_layers, B, plan.cells, cfg.num_heads, cfg.hidden_size // cfg.num_heads,
                           next(model.parameters()).dtype, device)
    exclude = torch.tensor([mask_id], dtype=torch.int64, device=device)
    bos = torch.full((B, 1), bos_id, dtype=torch.long, device=device) if shifted else None
    failed = torch.zeros((), dtype=torch.bool, device=device)  # a draw gumbel_argmax / hybrid_step rejects
    calls = rows_fed = logit_rows = 0
    # The step loop: everything it needs was computed and put on the device by _plan_steps, so it only
    # enqueues device work and never waits for it (no host synchronization until the end).
    with torch.no_grad(), _attention_backend(model, attention_backend, kv_cache):
        from tqdm import tqdm  # a declared dependency; imported here so that importing the module stays cheap

        for step in tqdm(plan.steps, desc="generate", unit="step", disable=not progress, leave=False):
            if not shifted:
                input_ids = x[:, step.start:step.end]
            elif step.start > 0:  # cell c holds position c - 1
                input_ids = x[:, step.start - 1:step.end - 1]
            else:  # cell 0 is the conditioning token
                input_ids = torch.cat([bos, x[:, :step.end - 1]], 1)
            fed = {"input_ids": input_ids, "logits_index": step.logits_index}
            if step.sigma is not None:
                fed["sigma"] = step.sigma

            def forward(fed, step=step):
                return model(fed["input_ids"], step.positions, step.mask, sigma=fed.get("sigma"),
                             kv_cache=cache, logits_index=fed["logits_index"], check=False)

            logits = forward(fed) if graphs is None else graphs(step.key, forward, fed)
            calls, rows_fed, logit_rows = calls + 1, rows_fed + step.rows_fed, logit_rows + step.logit_rows
            if step.targets is not None:
                flat = x.view(-1)
                if gamma_family:
                    current = flat.index_select(0, step.targets)
                    # s_x is never read by the step, so the log-score's current entry is left as is
                    log_score = gamma_log_score(logits, step.sigma_now, zero_current=False, check=False)
                    tokens, bad = hk.sampling.hybrid_step_deferred(
                        current, log_score, step.sigma_now, step.sigma_next, gamma, mask_id, seed, step.t,
                        step.targets, method=method, final=step.final, backend=sampler_backend)
                else:
                    tokens, bad = hk.sampling.gumbel_argmax_deferred(
                        logits, seed, step.t, step.targets, temperature=temperature, exclude=exclude,
                        backend=sampler_backend)
                flat.index_copy_(0, step.targets, tokens)
                failed |= bad
            if cache is not None:
                cache.length.fill_(step.settled)  # cells [0, settled) are final: their keys/values too
    if bool(failed):  # the one synchronization: what the per-call checks would have raised
        raise ValueError("generate: a draw failed: the model produced NaN logits (or, γ family, log-scores "
                         "with NaN/+inf or a row without a token of positive probability)")
    return GenerationResult(x, calls, rows_fed, logit_rows, time.perf_counter() - started)


@dataclass(frozen=True)
class _Step:
    """One model call of the step loop, with every tensor already on the device.

    ``t``: the schedule step (the draws' step). Cells ``[start, end)`` are fed (positions
    ``positions`` [1, end - start], mask ``mask`` over them); ``logits_index`` int64 [N]: their rows
    with logits, row-major over ``[B, end - start]``; ``targets`` int64 [R] (or None on a step whose
    prediction is discarded): the flat positions ``b·d + i`` sampled, in the order of the logits rows,
    which are also the rows' identities. γ family: ``sigma`` float32 [B or 1, end - start] (the model's
    conditioning), and per target ``sigma_now``, ``sigma_next`` float64 and ``final`` bool.
    ``settled``: the cache length after the call. ``rows_fed``, ``logit_rows``: counters. ``key``:
    equal for steps whose forward passes are interchangeable up to the tensors above (fed cells, logit
    row count and the mask's values), for ``StepGraphs``."""

    t: int
    start: int
    end: int
    positions: torch.Tensor
    mask: hk.masks.IntervalMask
    logits_index: torch.Tensor
    targets: torch.Tensor | None
    sigma: torch.Tensor | None
    sigma_now: torch.Tensor | None
    sigma_next: torch.Tensor | None
    final: torch.Tensor | None
    settled: int
    rows_fed: int
    logit_rows: int
    key: tuple


@dataclass(frozen=True)
class _Plan:
    steps: list
    cells: int  # cells of the sequence fed to the model (d, or d + 1 with the SHIFTED conditioning cell)


def _plan_steps(sched, B: int, seed: int, method: str, eta: float, frozen: torch.Tensor, noise, sigmas,
                mask_id: int, config: str, context: str, window: str, kv_cache: bool, skip_unchanged: bool,
                device: torch.device) -> _Plan:
    """Every model call of a generation, computed on the host before the first one (no model output
    is needed, see below), with its tensors moved to the device once.

    Which rows change at a step does not depend on the sampled tokens: in the ε family a row's
    decision (stream 1) depends on whether it is still MASK, and a masked row stops being MASK exactly
    when it is first resampled (MASK is never drawn); in the γ family every active non-prompt row
    moves. So the masked state can be tracked here, and the loop needs no host synchronization.
    """
    gamma_family = method in GAMMA_METHODS
    d = sched.length
    shifted = config == "shifted"
    cells = d + 1 if shifted else d
    row_ids = torch.arange(B)[:, None] * d + torch.arange(d)
    masked = ~frozen  # ε family: a non-prompt position is MASK until its first draw
    settled = 0  # the cache length, the same for every sequence
    # σ̄ of every level (``sigmas``, from the conditioning; γ family), and every step's transfer
    # probabilities, in one elementwise call each instead of one per step (the plan of a paper-scale
    # run has 1024 steps).
    prompt_free = not bool(frozen.any())
    p_transfer_table = None if gamma_family else transfer_probability(noise, sched, sched.table[:-1],
                                                                      sched.table[1:])
    steps = []
    # Steps often repeat a tensor (the same window rows, the same mask inside a block): build each
    # distinct one once and move it to the device once, keyed by what determines it. Sharing the mask
    # object also shares its tile maps.
    reused: dict = {}
    masks: dict = {}

    def moved(key, make) -> torch.Tensor:
        if key is None:
            return make().to(device)
        if key not in reused:
            reused[key] = make().to(device)
        return reused[key]

    for t in range(sched.num_steps):
        a, b = sched.split(t)
        if a == b:
            continue
        width = b - a
        now, nxt = sched.table[t, a:b], sched.table[t + 1, a:b]
        active_frozen = frozen[:, a:b]
        if gamma_family:
            change = ~active_frozen  # every active position may move; prompt positions never do
        else:
            p_transfer = p_transfer_table[t, a:b].expand(B, -1)
            state = torch.where(masked[:, a:b], mask_id, 0)  # only MASK-or-not matters to the decisions
            change = hk.sampling.acs_decisions(
                state.reshape(-1), p_transfer.reshape(-1), eta, mask_id, seed, t,
                row_ids=row_ids[:, a:b].reshape(-1), frozen=active_frozen.reshape(-1)).view(B, width)
            masked[:, a:b] &= ~change
        idle = not bool(change.any())
        if idle and skip_unchanged:
            continue
        start = settled if kv_cache else 0
        end = b + 1 if shifted else b
        n = end - start
        mask = hk.masks.inference(sched, t, config, context, window).rows(slice(start, None))
        mask_key = (mask.key_length, torch.cat([mask.prefix_end, mask.window_start, mask.window_end], 1)
                    .numpy().tobytes())
        if mask_key not in masks:
            masks[mask_key] = mask.to(device)
        mask = masks[mask_key]
        # The sampled rows, row-major over [B, width]. In the γ family they are fixed by (a, b) (every
        # non-prompt active row), so their index tensors are shared by the steps of one window. An idle
        # step (skip_unchanged=False) computes the prediction of every active non-prompt row and
        # discards it, as uncached MDLM does.
        static = gamma_family or idle
        rows_key = ("rows", a, b, idle)
        if not static or rows_key not in reused:
            sampled = (~active_frozen if idle else change).reshape(-1).nonzero().squeeze(1)
            rows = (sampled.numel(), sampled // width, sampled % width)
            if static:
                reused[rows_key] = rows  # host tensors, kept for the next step of this window
        else:
            rows = reused[rows_key]
        count, batch, column = rows
        # Cell a + j predicts position a + j in both configs.
        logits_index = moved(("logits", a, b, start) if static else None,
                             lambda: batch * n + (a - start) + column)
        targets = sigma = sigma_now = sigma_next = final = None
        if not idle:
            targets = moved(("targets", a, b) if static else None, lambda: batch * d + a + column)
        if gamma_family:
            # σ̄ of the token each cell holds: τ_t of its position (0 for settled and prompt cells); one
            # row shared by the batch when there is no prompt
            held = sched.table[t][None] if prompt_free else torch.where(frozen, 0, sched.table[t].expand(B, -1))
            held_sigma = sigmas.of_cells(held)
            if shifted:  # cell c holds position c - 1; cell 0 holds the clean conditioning token
                held_sigma = torch.cat([held_sigma.new_full((held_sigma.shape[0], 1), sigmas.clean), held_sigma], 1)
            sigma = moved(None, lambda: held_sigma[:, start:end].to(torch.float32))
            if not idle:
                sigma_now = moved(None, lambda: sigmas.active[now][column])
                sigma_next = moved(None, lambda: sigmas.active[nxt][column])
                final = moved(None, lambda: (nxt == 0)[column])
        if kv_cache:
            settled = a  # cells [0, a) are settled after this step
        steps.append(_Step(t, start, end, moved(("positions", start, end), lambda: torch.arange(start, end)[None]),
                           mask, logits_index, targets, sigma, sigma_now, sigma_next, final, settled, B * n,
                           count, (start, end, count, mask_key)))
    return _Plan(steps, cells)


@contextlib.contextmanager
def _attention_backend(model, backend: str | None, kv_cache: bool):
    """Run the enclosed model calls with ``backend`` (None: the model's own) for their ``decode`` calls
    (``kv_cache``) or ``attention`` calls, then restore the model's own."""
    if backend is None:
        yield
        return
    previous = (model.config.attention_backend, model.config.decode_backend)
    if kv_cache:
        model.use_attention_backend(previous[0], decode_backend=backend)
    else:
        model.use_attention_backend(backend, decode_backend=previous[1])
    try:
        yield
    finally:
        model.use_attention_backend(*previous)
