"""The reference trainer on a toy byte-level model: learning, LR schedule, EMA, exact resumption, DDP, CLI."""

import json
import math
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from hdlm_reference import cli
from hdlm_reference.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from hdlm_reference.data import TokenDataset, bundled_corpus_path, load_tokens, split_train_val
from hdlm_reference.tokenizer import ByteTokenizer
from hdlm_reference.trainer import ExponentialMovingAverage, TrainConfig, lr_multiplier, train

pytestmark = pytest.mark.usefixtures("single_thread")

TOKENIZER = ByteTokenizer()
SEQ_LEN = 32
TIMING_FIELDS = ("tokens_per_s", "elapsed_s", "time")


class ToyLM(nn.Module):
    """Embedding + MLP + readout: predicts the next byte from the current one (a bigram model)."""

    def __init__(self, seed: int, width: int = 32):
        super().__init__()
        generator_state = torch.get_rng_state()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(TOKENIZER.vocab_size, width)
        self.hidden = nn.Linear(width, width)
        self.readout = nn.Linear(width, TOKENIZER.vocab_size)
        torch.set_rng_state(generator_state)

    def forward(self, ids):
        return self.readout(torch.tanh(self.hidden(self.embed(ids))))


def make_loss_fn(mask_prob: float):
    """Next-byte cross-entropy; with ``mask_prob > 0`` inputs are randomly replaced by MASK using the global
    torch generator, like a noise process, so that exact resumption depends on the restored random state."""

    def loss_fn(model, batch, step):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if mask_prob:
            inputs = torch.where(torch.rand(inputs.shape) < mask_prob, TOKENIZER.mask_id, inputs)
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        accuracy = (logits.argmax(-1) == targets).float().mean()
        return loss, {"accuracy": accuracy, "step_parity": float(step % 2)}

    return loss_fn


@pytest.fixture(scope="module")
def corpus():
    train_tokens, val_tokens = split_train_val(load_tokens(bundled_corpus_path(), TOKENIZER), 0.05)
    return TokenDataset(train_tokens, SEQ_LEN), TokenDataset(val_tokens, SEQ_LEN)


def make_config(out_dir, **overrides):
    fields = dict(lr=3e-3, warmup_steps=5, total_steps=12, min_lr_ratio=0.1, grad_clip=1.0, ema_decay=0.9,
                  batch_size=8, seq_len=SEQ_LEN, log_every=1, ckpt_every=100, out_dir=str(out_dir), seed=11,
                  progress=False)
    fields.update(overrides)
    return TrainConfig(**fields)


def read_records(out_dir):
    """Training and evaluation records of metrics.jsonl; of a step logged twice (after a resume), the last."""
    records = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" not in record:
            kind = "eval" if "val_loss" in record else "train"
            records[(kind, record["step"])] = {k: v for k, v in record.items() if k not in TIMING_FIELDS}
    return records


def parameters_of(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---- schedule and EMA


def test_lr_multiplier_values():
    def m(step):
        return lr_multiplier(step, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)

    assert [m(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert m(4) == 1.0
    assert m(9) == pytest.approx(0.1 + 0.9 * 0.5)          # half-way through the cosine
    assert m(14) == pytest.approx(0.1) and m(50) == pytest.approx(0.1)
    assert all(m(s) >= m(s + 1) for s in range(3, 20))
    assert lr_multiplier(0, 0, 10, 0.0) == 1.0 and lr_multiplier(10, 0, 10, 0.0) == pytest.approx(0.0)


def test_trainer_applies_the_schedule(tmp_path, corpus):
    config = make_config(tmp_path, total_steps=8, warmup_steps=3)
    train(ToyLM(0), make_loss_fn(0.0), corpus[0], config)
    logged = [r["lr"] for (kind, _), r in sorted(read_records(tmp_path).items()) if kind == "train"]
    # the record of step s (steps completed) carries the lr used by step index s - 1
    assert logged == pytest.approx([config.lr * lr_multiplier(s, 3, 8, 0.1) for s in range(8)])


def test_ema_decay_warmup_and_average():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ExponentialMovingAverage(model, decay=0.5)
    assert ema.current_decay() == pytest.approx(0.1)              # (1 + 0) / (10 + 0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.9))
    ema.num_updates = 100
    assert ema.current_decay() == 0.5                             # capped at decay
    with ema.swapped_into(model):
        assert torch.allclose(model.weight, torch.full((1, 2), 0.9))
    assert torch.equal(model.weight, torch.ones(1, 2))
    assert torch.allclose(ema.model_state_dict(model)["weight"], torch.full((1, 2), 0.9))


# ---- learning and exact resumption


def test_loss_decreases(tmp_path, corpus):
    config = make_config(tmp_path, total_steps=50, warmup_steps=5, lr=1e-2)
    summary = train(ToyLM(0), make_loss_fn(0.0), corpus[0], config)
    losses = [r["loss"] for (kind, _), r in sorted(read_records(tmp_path).items()) if kind == "train"]
    assert len(losses) == 50 and summary.step == 50
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0   # from ~ln(257) = 5.5 towards bigram entropy
    assert losses[0] == pytest.approx(math.log(TOKENIZER.vocab_size), abs=0.3)
    assert summary.checkpoint.endswith("ckpt_000000050.pt")


def test_resume_is_bit_identical(tmp_path, corpus):
    train_data, val_data = corpus
    # log_every=3 puts the checkpoint of step 8 in the middle of a logging window (steps 7-9)
    config = dict(total_steps=14, ckpt_every=4, log_every=3, eval_every=4, eval_batches=2, grad_accum_steps=2)
    reference = ToyLM(0)
    train(reference, make_loss_fn(0.2), train_data, make_config(tmp_path / "a", **config), val_data=val_data)

    class Crash(Exception):
        pass

    def crashing_loss_fn(model, batch, step):
        if step == 10:
            raise Crash
        return make_loss_fn(0.2)(model, batch, step)

    with pytest.raises(Crash):
        train(ToyLM(0), crashing_loss_fn, train_data, make_config(tmp_path / "b", **config),
              val_data=val_data)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "ckpt_000000008.pt"

    resumed = ToyLM(1234)  # a different initialization: everything must come from the checkpoint
    torch.manual_seed(999)  # and so must the random state
    summary = train(resumed, make_loss_fn(0.2), train_data, make_config(tmp_path / "b", **config),
                    val_data=val_data)
    assert (summary.start_step, summary.step) == (8, 14)

    expected, got = parameters_of(reference), parameters_of(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    final_a = load_checkpoint(latest_checkpoint(tmp_path / "a" / "checkpoints"))
    final_b = load_checkpoint(latest_checkpoint(tmp_path / "b" / "checkpoints"))
    assert all(torch.equal(final_a["ema"]["shadow"][n], final_b["ema"]["shadow"][n]) for n in expected)
    for name, state in final_a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], final_b["optimizer"]["state"][name]["exp_avg_sq"])
    records_a, records_b = read_records(tmp_path / "a"), read_records(tmp_path / "b")
    assert records_a.keys() == records_b.keys() and ("eval", 12) in records_a and ("train", 9) in records_a
    assert records_a == records_b  # losses, metrics, lr, grad norms and validation losses, exactly
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines if "event" in line]
    assert events == ["start", "resume"]


def test_evaluation_does_not_change_training(tmp_path, corpus):
    with_eval = ToyLM(0)
    train(with_eval, make_loss_fn(0.2), corpus[0], make_config(tmp_path / "a", eval_every=2, eval_batches=2),
          val_data=corpus[1])
    without_eval = ToyLM(0)
    train(without_eval, make_loss_fn(0.2), corpus[0], make_config(tmp_path / "b"))
    pairs = zip(with_eval.parameters(), without_eval.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    evals = [r for (kind, _), r in read_records(tmp_path / "a").items() if kind == "eval"]
    assert len(evals) == 6
    assert all(math.isfinite(r["val_loss"]) and math.isfinite(r["val_loss_ema"]) for r in evals)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, corpus):
    one, accumulated = ToyLM(0), ToyLM(0)
    train(one, make_loss_fn(0.0), corpus[0], make_config(tmp_path / "a", total_steps=4))
    train(accumulated, make_loss_fn(0.0), corpus[0],
          make_config(tmp_path / "b", total_steps=4, grad_accum_steps=4))
    pairs = zip(one.parameters(), accumulated.parameters(), strict=True)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in pairs)


def test_checkpoints_kept_and_fresh_start_refused(tmp_path, corpus):
    config = make_config(tmp_path, total_steps=10, ckpt_every=2, keep_checkpoints=2)
    train(ToyLM(0), make_loss_fn(0.0), corpus[0], config)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [8, 10]
    with pytest.raises(ValueError, match="resume=False"):
        train(ToyLM(0), make_loss_fn(0.0), corpus[0], config, resume=False)
    summary = train(ToyLM(0), make_loss_fn(0.0), corpus[0], config)  # already complete: nothing to do
    assert (summary.start_step, summary.step) == (10, 10)


def test_config_and_argument_errors(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"TrainConfig\.warmup_steps must be an int >= 0, got -1"):
        make_config(tmp_path, warmup_steps=-1)
    with pytest.raises(ValueError, match="batch_size must be a multiple of grad_accum_steps=3"):
        make_config(tmp_path, grad_accum_steps=3)
    with pytest.raises(ValueError, match="seq_len must equal config.seq_len=16"):
        train(ToyLM(0), make_loss_fn(0.0), corpus[0], make_config(tmp_path, seq_len=16))
    with pytest.raises(ValueError, match="needs val_data"):
        train(ToyLM(0), make_loss_fn(0.0), corpus[0], make_config(tmp_path, eval_every=2))

    def bad_loss(model, batch, step):
        return model(batch).mean(-1), {}

    with pytest.raises(TypeError, match="scalar tensor"):
        train(ToyLM(0), bad_loss, corpus[0], make_config(tmp_path / "bad"))


# ---- data parallelism


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, world_size, port, out_dir, tokens):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = ToyLM(seed=100 + rank)  # different on each rank: DDP must broadcast rank 0's weights
    # 2 micro-batches per rank: the first backward runs under no_sync, the second all-reduces
    config = make_config(out_dir, total_steps=3, batch_size=8, grad_accum_steps=2, device="cpu")
    train(model, make_loss_fn(0.0), TokenDataset(tokens, SEQ_LEN), config)
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_cpu_processes(tmp_path, corpus):
    tokens = corpus[0].tokens
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path), tokens), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    initial = ToyLM(100).state_dict()
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)           # identical on both ranks
    assert all(not torch.equal(rank0[n], initial[n]) for n in rank0)     # and trained

    # the same global batch in one process gives the same weights, up to the order of float additions
    single = ToyLM(100)
    train(single, make_loss_fn(0.0), corpus[0],
          make_config(tmp_path / "single", total_steps=3, batch_size=8, device="cpu"))
    assert all(torch.allclose(rank0[n], p, atol=1e-5) for n, p in single.state_dict().items())
    saved = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert saved["world_size"] == 2 and len(saved["ranks"]) == 2


# ---- command line


def test_cli_help(capsys):
    for argv in (["--help"], ["train", "--help"], ["prepare-bin", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0
    assert "--preset" in capsys.readouterr().out


def test_cli_backend_flags_are_refused_at_parse_time_naming_the_op(capsys):
    # The names come from the backend registry: "cuda" is a decode backend, not an attention one.
    parser = cli.build_parser()
    assert parser.parse_args(["train", "--attention-backend", "triton"]).attention_backend == "triton"
    assert parser.parse_args(["sample", "--run", "r", "--attention-backend", "cuda"]).attention_backend == "cuda"
    for argv, message in ((["train", "--attention-backend", "cuda"], "attention has no backend 'cuda'"),
                          (["sample", "--run", "r", "--sampler-backend", "gpu"], "gumbel_argmax has no backend 'gpu'"),
                          (["sample", "--run", "r", "--attention-backend", "fast"], "decode has no backend 'fast'")):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_cli_train_without_model_module_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hdlm_reference.model", None)  # as if the module did not exist
    status = cli.main(["train", "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    assert status == 2
    assert "hdlm train needs the module hdlm_reference.model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_options_reach_the_config_and_data(tmp_path):
    args = cli.build_parser().parse_args(["train", "--preset", "tiny", "--steps", "7", "--lr", "0.01",
                                          "--grad-clip", "0", "--no-bf16", "--out", str(tmp_path)])
    config = cli.make_train_config(args)
    preset = cli.PRESETS["tiny"].train
    assert (config.total_steps, config.lr, config.grad_clip, config.bf16, config.out_dir) == (
        7, 0.01, None, False, str(tmp_path))
    assert (config.seq_len, config.batch_size, config.warmup_steps) == (
        preset["seq_len"], preset["batch_size"], preset["warmup_steps"])
    train_data, val_data, vocab_size = cli.load_training_data(args, config.seq_len)
    assert vocab_size == 256 and train_data.num_tokens + val_data.num_tokens == len(
        load_tokens(bundled_corpus_path(), TOKENIZER))
    bad = cli.build_parser().parse_args(["train", "--batch-size", "0"])
    with pytest.raises(cli.CliError, match="batch_size must be an int >= 1, got 0"):
        cli.make_train_config(bad)


def test_cli_prepare_bin(tmp_path, capsys):
    assert cli.main(["prepare-bin", str(bundled_corpus_path()), "--out", str(tmp_path / "c.bin")]) == 0
    assert load_tokens(tmp_path / "c.bin").tolist() == load_tokens(bundled_corpus_path(), TOKENIZER).tolist()
    assert cli.main(["prepare-bin", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "d.bin")]) == 2
    assert "missing.txt" in capsys.readouterr().err
