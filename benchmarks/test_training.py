"""One full training step with interval packing (paper App. B.3; docs/architecture.md): tokens/s by
attention backend.

A step is what ``hdlm_reference.trainer`` does per optimizer step, without its file writing, EMA and
LR schedule: ``zero_grad``; ``hdlm_reference.objective.PackedObjective`` (host-side interval packing of
the batch into ``2d`` cells, forward noise, the model's forward over the packed mask, the Eq. 10 loss);
``backward``; gradient clipping at 1.0 and ``AdamW.step`` with the trainer's defaults. Every
contender is the same model (ε-Hybrid, ε = 0.01, ALIGNED, random initial weights) with its attention
routed through one ``hk.attention`` backend:

* ``triton``: our Triton kernel over the interval mask (forward and backward), GPU only (on a CPU only
  its interpreter runs, which is not a speed measurement);
* ``flex``: ``torch.compile``'d FlexAttention on the mask's BlockMask, GPU only (PyTorch has no CPU
  backward for FlexAttention);
* ``reference``: SDPA with the dense ``[2d, 2d]`` mask, the baseline of the ratios.

Each contender replays the same steps (the objective's packing and noise draws are keyed by the step
index, restarted per contender), so all see the same packed layouts; the model and optimizer state are
rebuilt from the same seed per contender. ``tokens_per_s`` is ``batch · d`` (the sequence tokens one
step trains on, as the trainer counts them; the packed input has ``2d`` cells) over the median step.

Shapes: on a GPU the paper's ``small`` preset (12 layers, hidden 768, 12 heads, V = 50258, dropout 0.1),
d = 1024, batch 8, bf16 autocast over fp32 weights (as the trainer), τ_Block ω ∈ {16, 256} (block-causal
context) and τ_Slide ω = 256 (causal), 2 warm-up and 10 timed steps. On a CPU a small default: ``tiny``
preset, d = 64, batch 4, fp32, τ_Block ω = 16 and τ_Slide ω = 16, one intra-op thread (tiny ops on a
loaded 2-core machine are 10-100x slower oversubscribed), 1 warm-up and 5 timed steps, so that
``make bench`` stays fast.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from benchmarks.timing import median_seconds, synchronized
from hdlm_reference.model import DiT, ModelConfig
from hdlm_reference.objective import ObjectiveConfig, PackedObjective

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
PRESET, LENGTH, BATCH = ("small", 1024, 8) if GPU else ("tiny", 64, 4)
SCHEDULES = [("block", 16), ("block", 256), ("slide", 256)] if GPU else [("block", 16), ("slide", 16)]
ROUNDS, WARMUP_ROUNDS = (10, 2) if GPU else (5, 1)
# The trainer's defaults (hdlm_reference.trainer.TrainConfig).
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 3e-4, (0.9, 0.95), 0.1, 1.0
BACKENDS = ["triton", "flex", "reference"]
BASELINE = "reference"




@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    vocab = ModelConfig.preset(PRESET).vocab_size
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab - 1, (BATCH, LENGTH), generator=g).to(DEVICE)  # MASK excluded


def require(backend: str) -> None:
    if backend == "triton" and not GPU:
        pytest.skip("Triton runs on CPU only in the interpreter, which is not a speed measurement")
    if backend == "flex" and not GPU:
        pytest.skip("PyTorch has no CPU backward for FlexAttention")


def autocast():
    if GPU:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{s[0]}_w{s[1]}")
def test_training_step(benchmark, threads, tokens, schedule, backend):
    require(backend)
    kind, width = schedule
    torch.manual_seed(0)
    model = DiT(ModelConfig.preset(PRESET, family="epsilon", max_length=LENGTH, attention_backend=backend))
    model = model.to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    objective = PackedObjective(ObjectiveConfig(family="epsilon", schedule=kind, width=width),
                                model.config.vocab_size, LENGTH, seed=0)
    step = 0

    def train_step() -> float:
        nonlocal step
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss, _ = objective(model, tokens, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        step += 1
        return loss

    sched = objective.sched
    cfg = model.config
    benchmark.group = (f"training step ({kind} w={width}): B={BATCH} d={LENGTH} ({PRESET}: {cfg.num_layers} "
                       f"layers, hidden {cfg.hidden_size}, V={cfg.vocab_size})")
    with warnings.catch_warnings():  # compile and autotune outside the timing
        warnings.simplefilter("ignore")
        for _ in range(0 if benchmark.disabled else WARMUP_ROUNDS):
            train_step()
        step = 0  # every contender times the same steps (same packing and noise draws)
        loss = benchmark.pedantic(synchronized(train_step), rounds=ROUNDS, warmup_rounds=0)

    info = dict(shape=f"B={BATCH} d={LENGTH} packed={2 * LENGTH} V={cfg.vocab_size}",
                dtype="bf16 autocast" if GPU else "float32",
                side="ours" if backend == "triton" else "baseline", backend=backend,
                schedule=f"{kind} w={width} levels={sched.num_levels}",
                context=objective.objective.attention_context)
    if not GPU:
        info["threads"] = threads
    median = median_seconds(benchmark)
    if median is not None:  # None under --benchmark-disable
        info["seconds"] = float(f"{median:.4g}")
        info["tokens_per_s"] = float(f"{BATCH * LENGTH / median:.4g}")
    if backend == BASELINE:
        info["baseline"] = True
    benchmark.extra_info.update(info)
    assert torch.isfinite(loss)  # a real step, not a timing assertion
