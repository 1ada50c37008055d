"""Unconditional generation, end to end: the analog of the paper's Table 10 (App. F; docs/benchmarks.md).

Table 10 reports the wall-clock of generating 8 samples of d = 1024 tokens on one A100 with the same
number of diffusion steps for every model: SEDD 68 s, MDLM 59 s, MDLM + caching 36 s, γ-Hybrid
[τ_Flat] 131 s, γ-Hybrid [τ_Block^{d/4}] 79 s, + KV caching 38 s. Here every row is one full
``hdlm_reference.generate`` call (all model calls, the sampling draws and the host-side bookkeeping),
on random weights of the same architecture (the time does not depend on training), all with
``T = 1024`` steps on a GPU:

* ``sedd``: γ family with γ = 0 (absorbing diffusion) on ``hk.schedules.flat(d, T)``, ``method="analytic"``
  (τ-leaping, SEDD's sampler); a σ̄-conditioned network, so the model runs at every step on all d rows;
* ``mdlm``: ε family on ``flat``, ``method="original"`` (MDLM's ancestral sampler) with
  ``skip_unchanged=False``: the model runs at every step, as MDLM's ``ddpm`` sampler does;
* ``mdlm_caching``: the same with ``skip_unchanged=True``, MDLM's ``ddpm_cache`` (p(x0) caching: a step
  where no row of the batch changes reuses the previous prediction, valid because the network is not
  time-conditioned);
* ``gamma_hybrid_flat``: γ-Hybrid (γ = 0.01) on ``flat``, analytic;
* ``gamma_hybrid_block``: γ-Hybrid on ``hk.schedules.block(d, d/4, T/4)`` (τ_Block^{d/4}, ``T`` steps),
  analytic: only the settled prefix and the active block are fed (d/4 ... d rows per call);
* ``gamma_hybrid_block_kv``: the same with ``kv_cache=True``: each call feeds only the block (plus, once,
  the block that just settled);
* ``epsilon_hybrid_block_acs_kv``: ε-Hybrid on τ_Block^{d/4} with ACS (η = 0.01) and the KV cache (not in
  Table 10: the paper's best sampler; ε-Hybrid is not time-conditioned, so steps with no change are
  skipped as in MDLM's caching).

Each row runs on two paths, the same algorithm with the same random draws (the tokens agree up to
the attention kernels' rounding, which in bf16 can flip a draw):
``reference`` (``attention_backend="reference"``: SDPA with a dense mask, KV-cached calls through the
reference decode; ``sampler_backend="reference"``: the row-chunked PyTorch FP64 draws) and ``kernels``
(``attention_backend="auto"`` and ``sampler_backend="auto"``: the Triton attention and decode kernels,
the fused CUDA/Triton sampler and, on a GPU, the per-step forward replayed as CUDA graphs wherever
steps repeat their shapes (``cuda_graphs=True``); on a CPU the reference attention with the C++
sampler). Both paths run the step loop of ``generate``, which never waits for the device.
On the flat rows (SEDD, MDLM, γ flat) every row attends every cell, and the reference attention then
calls SDPA without a mask (``IntervalMask.attends_all``), whose FlashAttention-2 kernel on a GPU is what
SEDD's and MDLM's own code run through the flash-attn package (unmasked varlen); the package itself is
not used here. The ``_kv`` rows use the KV cache on both paths (the reference path then shows what the cache alone
buys with dense attention, as the paper's "+ KV-caching" row did); the others use none.

``extra_info``: ``seconds`` (the median of the timed rounds, synchronized), ``tokens_per_s``
(8·d / seconds, the tokens/s column), ``model_calls``, ``rows_fed`` (query rows fed to the model, summed
over calls), ``logit_rows`` (rows whose logits were computed), ``method``, ``schedule``, ``path``,
``attention`` and ``sampler`` (the backends the path resolved to on this machine), ``kv_cache``,
``skip_unchanged`` and ``paper_a100_s`` (the Table 10 time of the row; not comparable in absolute terms:
another GPU and another implementation). ``side`` is ``baseline`` for the other methods (SEDD, MDLM) and
``ours`` for the hybrid rows. Baseline of the ratios: ``sedd`` on the reference path.

The rows are these samplers' algorithms in this harness, not the official codes: the LM head runs only
on the rows a step samples (MDLM's code computes all B·d rows' logits at every step; SEDD's and the
official γ sampler's full-length steps compute all of them, as here), attention is SDPA or our
kernels rather than the official materialized einsum, and the draws are exact FP64 Gumbel-max.

On the counters: at 8 samples and T = d, each sequence unmasks about one token per step, so a step
where no row of the whole batch changes (the only steps MDLM's caching can skip, here as in MDLM's
code) occurs with probability about e^-8: ``mdlm`` and ``mdlm_caching`` make the same model calls. The
caching pays with fewer samples per batch or more steps than tokens (MDLM's README: batch 1, T = 5k).

Shapes: on a GPU the paper's: ``small`` preset (12 layers, hidden 768, 12 heads, V = 50258), d = 1024,
T = 1024, batch 8, bf16 weights, one warm-up generation (compile and autotune; untimed) and 1 timed
round. On a CPU a small default: ``tiny`` preset (2 layers, hidden 64, V = 257), d = 64, T = 64, batch 8,
fp32, one intra-op thread (tiny ops on a loaded 2-core machine are 10-100x slower oversubscribed), a
one-step warm-up and 2 timed rounds, so that ``make bench`` stays fast.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

import hdlm_kernels as hk
from benchmarks.timing import median_seconds, synchronized
from hdlm_reference.generate import GenerationResult, generate
from hdlm_reference.model import DiT, ModelConfig

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
PRESET, LENGTH, STEPS, BATCH = ("small", 1024, 1024, 8) if GPU else ("tiny", 64, 64, 8)
DTYPE = torch.bfloat16 if GPU else torch.float32
ROUNDS = 1 if GPU else 2
SEED = 1234
GAMMA = 0.01  # γ-Hybrid's γ (the official default); SEDD is γ = 0
ETA = 0.01  # ACS
PATHS = {"reference": dict(attention_backend="reference", sampler_backend="reference"),
         "kernels": dict(attention_backend="auto", sampler_backend="auto", cuda_graphs=GPU)}


@dataclass(frozen=True)
class Row:
    """One Table 10 row: which model, schedule and sampler."""

    family: str  # "sedd" (γ family, γ = 0), "gamma", "epsilon"
    schedule: str  # "flat" or "block"
    method: str
    kv_cache: bool = False
    skip_unchanged: bool = True
    eta: float = 0.0
    paper_a100_s: float | None = None


def sedd() -> Row:
    return Row("sedd", "flat", "analytic", paper_a100_s=68)


def mdlm() -> Row:
    return Row("epsilon", "flat", "original", skip_unchanged=False, paper_a100_s=59)


def mdlm_caching() -> Row:
    return Row("epsilon", "flat", "original", skip_unchanged=True, paper_a100_s=36)


def gamma_hybrid_flat() -> Row:
    return Row("gamma", "flat", "analytic", paper_a100_s=131)


def gamma_hybrid_block() -> Row:
    return Row("gamma", "block", "analytic", paper_a100_s=79)


def gamma_hybrid_block_kv() -> Row:
    return Row("gamma", "block", "analytic", kv_cache=True, paper_a100_s=38)


def epsilon_hybrid_block_acs_kv() -> Row:
    return Row("epsilon", "block", "acs", kv_cache=True, eta=ETA)


ROWS = [sedd, mdlm, mdlm_caching, gamma_hybrid_flat, gamma_hybrid_block, gamma_hybrid_block_kv,
        epsilon_hybrid_block_acs_kv]
BASELINE = (sedd, "reference")
# The other methods' samplers (SEDD, MDLM), run in this harness: the report's baseline side.
OTHER_METHODS = (sedd, mdlm, mdlm_caching)


def resolved_backends(path: str) -> dict:
    """What ``"auto"`` of a path runs on this machine, for the notes: on a CPU the kernels path is the
    reference attention (the Triton kernels run there only in the interpreter) with the C++ sampler."""
    options = PATHS[path]
    attention = options["attention_backend"]
    sampler = options["sampler_backend"]
    if attention == "auto":
        attention = "triton" if GPU else "reference"
    if sampler == "auto":
        try:
            sampler = hk.sampling.fused_backend(DEVICE)
        except RuntimeError:  # no fused kernel here: auto is the reference
            sampler = "reference"
    return dict(attention=attention, sampler=sampler)


def schedule(kind: str) -> hk.schedules.Hyperschedule:
    if kind == "flat":
        sched = hk.schedules.flat(LENGTH, STEPS)
    else:  # τ_Block^{d/4} with the same number of steps: T = levels · 4
        sched = hk.schedules.block(LENGTH, LENGTH // 4, STEPS // 4)
    assert sched.num_steps == STEPS, sched
    return sched


def describe(sched: hk.schedules.Hyperschedule) -> str:
    if sched.kind == "flat":
        return f"flat T={sched.num_steps}"
    return f"block w={sched.width} levels={sched.num_levels} T={sched.num_steps}"




@pytest.fixture(scope="module")
def models() -> dict[str, DiT]:
    """Random-weight models of the preset, one per family, in eval mode on the device."""

    def build(family: str, **overrides) -> DiT:
        torch.manual_seed(0)
        config = ModelConfig.preset(PRESET, family=family, max_length=LENGTH, **overrides)
        return DiT(config).to(device=DEVICE, dtype=DTYPE).eval()

    return {"sedd": build("gamma", gamma=0.0), "gamma": build("gamma", gamma=GAMMA),
            "epsilon": build("epsilon")}




def measure(benchmark, models: dict[str, DiT], threads: int, contender, path: str) -> None:
    row = contender()
    model = models[row.family]
    sched = schedule(row.schedule)
    options = dict(method=row.method, kv_cache=row.kv_cache, eta=row.eta, skip_unchanged=row.skip_unchanged,
                   **PATHS[path])
    results: list[GenerationResult] = []

    def run() -> GenerationResult:
        result = generate(model, sched, BATCH, SEED, **options)
        results.append(result)
        return result

    target = synchronized(run)
    cfg = model.config
    benchmark.group = (f"generation: {BATCH} samples x d={LENGTH}, T={STEPS} ({PRESET}: {cfg.num_layers} "
                       f"layers, hidden {cfg.hidden_size}, V={cfg.vocab_size})")
    with warnings.catch_warnings():  # compile, autotune and allocate outside the timing
        warnings.simplefilter("ignore")
        if not benchmark.disabled:
            if GPU and path == "kernels":  # Triton compiles and autotunes for every shape the run meets
                target()
            else:  # nothing to compile: one step initializes the libraries
                synchronized(generate)(model, hk.schedules.flat(LENGTH, 1), BATCH, SEED, **options)
        benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=0)

    last = results[-1]
    info = dict(shape=f"B={BATCH} d={LENGTH} T={STEPS} V={cfg.vocab_size}",
                dtype=str(DTYPE).replace("torch.", ""),
                side="baseline" if contender in OTHER_METHODS else "ours", method=row.method, schedule=describe(sched), path=path, **resolved_backends(path),
                kv_cache=row.kv_cache, skip_unchanged=row.skip_unchanged,
                model_calls=last.model_calls, rows_fed=last.rows_fed, logit_rows=last.logit_rows)
    if row.family != "epsilon":
        info["gamma"] = cfg.gamma
    if row.eta:
        info["eta"] = row.eta
    if not GPU:
        info["threads"] = threads
    if row.paper_a100_s is not None:
        info["paper_a100_s"] = row.paper_a100_s
    median = median_seconds(benchmark)
    if median is not None:  # None under --benchmark-disable
        info["seconds"] = float(f"{median:.4g}")
        info["tokens_per_s"] = float(f"{BATCH * LENGTH / median:.4g}")
    if (contender, path) == BASELINE:
        info["baseline"] = True
    benchmark.extra_info.update(info)
    assert not (last.tokens == cfg.mask_id).any()  # a complete generation, not a timing assertion


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("contender", ROWS, ids=lambda c: c.__name__)
def test_generation(benchmark, models, threads, contender, path):
    measure(benchmark, models, threads, contender, path)
