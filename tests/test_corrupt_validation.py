"""corrupt validates its inputs (ValueError naming the argument, the expected range and the given value),
corrupt_deferred draws the same without a host synchronization and reports the rejected positions in a
device tensor, and the training loop raises from that report (docs/sampling-stream.md, "Corruption")."""

import math

import pytest
import torch

import hdlm_kernels as hk

N, MASK = 10, 10


def args(**changes):
    base = dict(x0=torch.tensor([[0, 3, 9, MASK], [1, 2, 4, 5]]),
                p_mask=torch.tensor([0.3], dtype=torch.float64),
                p_shuffle=torch.tensor([0.2], dtype=torch.float64), num_tokens=N, mask_id=MASK, seed=5, step=1)
    base.update(changes)
    return base


@pytest.mark.parametrize("changes, message", [
    (dict(p_mask=torch.tensor([1.5], dtype=torch.float64)), r"p_mask must be probabilities in \[0, 1\].*got 1.5"),
    (dict(p_mask=torch.tensor([math.nan], dtype=torch.float64)), r"p_mask must be .*no NaN.*got nan"),
    (dict(p_mask=torch.tensor([-0.1], dtype=torch.float64)), r"p_mask must be .*got -0.1"),
    (dict(p_shuffle=torch.tensor([-1e-3], dtype=torch.float64)), r"p_shuffle must be .*got -0.001"),
    (dict(p_shuffle=torch.tensor([math.nan], dtype=torch.float64)), r"p_shuffle must be .*got nan"),
    (dict(p_mask=torch.tensor([0.7], dtype=torch.float64), p_shuffle=torch.tensor([0.4], dtype=torch.float64)),
     r"p_mask \+ p_shuffle must be <= 1, got 0.7 \+ 0.4 = 1.1"),
    (dict(x0=torch.tensor([0, 11, 2])), r"x0 must be token ids in \[0, num_tokens\) = \[0, 10\) or mask_id = 10, "
                                        r"got 11 at flat position 1"),
    (dict(x0=torch.tensor([0, -2, 2])), r"x0 must be token ids .*got -2"),
    (dict(mask_id=4), r"mask_id must lie outside the real vocabulary \[0, num_tokens\) = \[0, 10\).*got mask_id = 4"),
])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_corrupt_rejects_bad_values(changes, message, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    with pytest.raises(ValueError, match=message):
        hk.sampling.corrupt(**args(**changes), backend=backend)


def test_valid_edges_are_accepted():
    x_t, masked, _ = hk.sampling.corrupt(**args(p_mask=torch.tensor([1.0], dtype=torch.float64),
                                                p_shuffle=torch.tensor([0.0], dtype=torch.float64)))
    real = torch.tensor([[True, True, True, False], [True] * 4])
    assert torch.equal(masked, real) and bool((x_t == MASK).all())
    hk.sampling.corrupt(**args(p_mask=torch.tensor([0.25], dtype=torch.float64),
                               p_shuffle=torch.tensor([0.75], dtype=torch.float64)))


def test_deferred_matches_corrupt_and_flags_bad_positions():
    good = args()
    expected = hk.sampling.corrupt(**good)
    x_t, masked, shuffled, invalid = hk.sampling.corrupt_deferred(**good)
    for ours, theirs in zip((x_t, masked, shuffled), expected):
        assert torch.equal(ours, theirs)
    assert invalid.shape == good["x0"].shape and not bool(invalid.any())
    p_mask = torch.tensor([[0.1, math.nan, 0.2, 0.3], [0.5, 0.5, 1.2, 0.1]], dtype=torch.float64)
    x0 = torch.tensor([[0, 3, 9, MASK], [1, 12, 4, -1]])
    *_, invalid = hk.sampling.corrupt_deferred(**args(x0=x0, p_mask=p_mask))
    assert invalid.tolist() == [[False, True, False, False], [False, True, True, True]]
    with pytest.raises(ValueError, match="mask_id must lie outside"):  # scalars are still checked
        hk.sampling.corrupt_deferred(**args(mask_id=3))


def test_noise_process_reports_invalid_positions_without_a_sync():
    from hdlm_reference.noise import Absorb, PhiloxStream

    process = Absorb(vocab_size=N + 1)
    x0 = torch.tensor([[0, 3, 9, MASK]])
    _, events = process.sample(x0, torch.tensor(0.5), PhiloxStream(seed=3, step=0, backend="reference"),
                               return_events=True)
    assert events.invalid is not None and not bool(events.invalid.any())


def test_trainer_raises_when_the_corruption_flags_positions(tmp_path):
    from torch import nn

    from hdlm_reference.data import TokenDataset
    from hdlm_reference.trainer import CORRUPTION_METRIC, TrainConfig, train

    vocab = 16
    model = nn.Sequential(nn.Embedding(vocab + 1, 8), nn.Linear(8, vocab + 1))

    def loss_fn(model, batch, step):
        p_mask = torch.full(batch.shape, 1.5 if step >= 2 else 0.5, dtype=torch.float64)  # bad from step 2
        x_t, _, _, invalid = hk.sampling.corrupt_deferred(batch, p_mask, torch.zeros_like(p_mask), vocab, vocab,
                                                          seed=1, step=step)
        logits = model(x_t)
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab + 1), batch.reshape(-1))
        return loss, {CORRUPTION_METRIC: invalid.sum()}

    data = torch.randint(0, vocab, (4096,)).numpy()
    config = TrainConfig(lr=1e-3, warmup_steps=1, total_steps=4, batch_size=4, seq_len=8, log_every=1,
                         ckpt_every=100, out_dir=str(tmp_path), seed=0, progress=False)
    with pytest.raises(ValueError, match="forward corruption .* rejected positions .* step 3"):
        train(model, loss_fn, TokenDataset(data, 8), config)
