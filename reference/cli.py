"""The ``hdlm`` command: ``hdlm train``, ``hdlm sample`` and ``hdlm prepare-bin``.

``hdlm train`` builds everything through :func:`build_training` (data, configuration, model, loss) and
hands it to :func:`hdlm_reference.trainer.train`; under ``torchrun`` every rank runs the same command.
The model and the losses come from ``hdlm_reference.model`` and ``hdlm_reference.losses``, imported only
when ``train`` runs, so ``hdlm --help`` works without them and ``hdlm train`` says clearly when they are
missing.

Examples::

    hdlm train --preset tiny --steps 200 --out runs/tiny            # bundled corpus, byte tokenizer
    hdlm sample --run runs/tiny --num-samples 4 --compare-cache      # τ_Block + KV cache + ACS
    hdlm prepare-bin my_texts/ --out data/corpus.bin                 # text -> nanoGPT-style uint16 tokens
    torchrun --nproc_per_node 8 -m hdlm_reference.cli train --preset paper --data data/owt.bin ...
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PRESETS", "CliError", "Preset", "TrainingSetup", "build_parser", "build_training",
           "load_training_data", "main", "make_train_config", "load_run"]

MODEL_CONFIG_FILE = "model_config.json"
OBJECTIVE_FILE = "objective.json"


@dataclass(frozen=True)
class Preset:
    """Default training hyperparameters (``TrainConfig`` fields) and model sizes of a named setup.

    ``model`` holds ``hdlm_reference.model.ModelConfig`` fields (``hidden_size``, ``num_layers``,
    ``num_heads``, ``cond_dim``, ``dropout``; paper sizes from notes/official-implementation.md §4.1), for
    :func:`build_training` to pass on with the data's vocabulary size.
    """

    train: dict
    model: dict


PRESETS: dict[str, Preset] = {
    # a few minutes on a laptop CPU with the bundled corpus
    "tiny": Preset(train=dict(seq_len=128, batch_size=16, total_steps=2000, warmup_steps=100, lr=1e-3,
                              min_lr_ratio=0.1, log_every=20, ckpt_every=500, eval_every=500, eval_batches=4),
                   model=dict(hidden_size=128, num_heads=4, num_layers=2, cond_dim=64, dropout=0.0)),
    # one GPU, an hour or so
    "small": Preset(train=dict(seq_len=256, batch_size=64, total_steps=20_000, warmup_steps=1000, lr=6e-4,
                               min_lr_ratio=0.1, log_every=50, ckpt_every=2000, eval_every=2000,
                               eval_batches=16),
                    model=dict(hidden_size=384, num_heads=6, num_layers=6, cond_dim=128, dropout=0.1)),
    # the paper's OpenWebText setup (App. B.1, E; Table 10): d = 1024, global batch 512, ~850K updates;
    # optimizer of the official ε run: no warmup, cosine from 3e-4 to 4e-5, AdamW (0.9, 0.95), wd 0.1
    "paper": Preset(train=dict(seq_len=1024, batch_size=512, total_steps=850_000, warmup_steps=0, lr=3e-4,
                               min_lr_ratio=4e-5 / 3e-4, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0,
                               ema_decay=0.9999, log_every=100, ckpt_every=5000, eval_every=5000,
                               eval_batches=32),
                    model=dict(hidden_size=768, num_heads=12, num_layers=12, cond_dim=128, dropout=0.1)),
}


class CliError(Exception):
    """An error to report as one line (``hdlm: error: ...``) with exit status 2, without a traceback."""


@dataclass
class TrainingSetup:
    """Everything :func:`hdlm_reference.trainer.train` needs, built from the command line."""

    model: object                    # torch.nn.Module
    loss_fn: object                  # hdlm_reference.trainer.LossFn
    train_data: object               # hdlm_reference.data.TokenDataset
    val_data: object | None          # hdlm_reference.data.TokenDataset or None
    config: object                   # hdlm_reference.trainer.TrainConfig
    vocab_size: int                  # token ids of the data (without MASK)
    preset: Preset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hdlm", description="Hyperschedule diffusion LMs: reference harness (hdlm-kernels).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a model (resumes from the newest checkpoint in --out)",
                                description="Train with the reference trainer (AdamW, warmup + cosine, EMA, "
                                "torchrun DDP, atomic checkpoints, exact resume). Options left out take the "
                                "preset's value, then TrainConfig's default.")
    data = train.add_argument_group("data")
    data.add_argument("--data", nargs="+", metavar="PATH",
                      help="one .bin token file, or text files / directories of *.txt (one document per "
                      "file, byte tokenizer); default: the bundled corpus")
    data.add_argument("--val-data", nargs="+", metavar="PATH",
                      help="validation data in the same form; default: the tail of --data (--val-fraction)")
    data.add_argument("--val-fraction", type=float, default=0.05,
                      help="share of --data kept for validation when --val-data is not given (default 0.05; "
                      "0 disables evaluation)")
    data.add_argument("--vocab-size", type=int,
                      help="number of token ids in a .bin file (e.g. 50257 for GPT-2), MASK excluded; "
                      "default 256 (byte tokens, as written by `hdlm prepare-bin`)")
    run = train.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                     help="model size and defaults (default tiny)")
    run.add_argument("--steps", type=int, dest="total_steps", help="optimizer steps in total")
    run.add_argument("--out", dest="out_dir", help="output directory (default runs/PRESET)")
    run.add_argument("--no-resume", action="store_true",
                     help="refuse to start if --out already holds checkpoints (default: resume from the "
                     "newest)")
    run.add_argument("--seed", type=int)
    run.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    run.add_argument("--no-bf16", dest="bf16", action="store_false", default=None,
                     help="no bf16 autocast on CUDA")
    run.add_argument("--deterministic", action="store_true", default=None,
                     help="deterministic kernels (bit-exact resumes on CUDA)")
    run.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                     help="no progress bar")
    diffusion = train.add_argument_group("diffusion (what is trained; saved with the run for `hdlm sample`)")
    diffusion.add_argument("--objective", choices=["packed", "step"], default="packed",
                           help="interval-packed training (App. B.3, default) or one hyperschedule step per "
                           "batch (the official code's style)")
    diffusion.add_argument("--family", choices=["epsilon", "gamma"], default="epsilon",
                           help="ε-hybrid (HDCE, no σ conditioning) or γ-hybrid (DWDSE, adaLN on σ̄)")
    diffusion.add_argument("--schedule", choices=["block", "slide"], default="block", help="hyperschedule")
    diffusion.add_argument("--width", type=int, default=16, help="window width ω (default 16)")
    diffusion.add_argument("--levels", type=int, help="noise levels 𝒯 (default: the width, ρ = 1)")
    diffusion.add_argument("--config", choices=["aligned", "shifted"], default="aligned")
    diffusion.add_argument("--context", choices=["causal", "block_causal", "full"],
                           help="attention among settled tokens (default block_causal for block, causal for slide)")
    diffusion.add_argument("--window", choices=["full", "causal"], default="full")
    diffusion.add_argument("--gamma", type=float, default=0.01, help="γ of the γ-hybrid process")
    diffusion.add_argument("--epsilon", type=float, default=0.01, help="ε of the ε-hybrid process")
    diffusion.add_argument("--beta1", type=float, default=1.0, help="weight of the settled CE (Eq. 10)")
    diffusion.add_argument("--beta2", type=float, default=1.0, help="weight of the diffusion loss (Eq. 10)")
    optim = train.add_argument_group("optimization")
    optim.add_argument("--batch-size", type=int, help="global sequences per optimizer step (all ranks)")
    optim.add_argument("--seq-len", type=int, help="tokens per sequence (the paper's d)")
    optim.add_argument("--grad-accum", type=int, dest="grad_accum_steps", help="micro-batches per step")
    optim.add_argument("--lr", type=float, help="peak learning rate")
    optim.add_argument("--min-lr-ratio", type=float, help="final lr as a fraction of the peak")
    optim.add_argument("--warmup-steps", type=int)
    optim.add_argument("--betas", type=float, nargs=2, metavar=("BETA1", "BETA2"))
    optim.add_argument("--weight-decay", type=float)
    optim.add_argument("--grad-clip", type=float, help="max gradient norm; 0 disables clipping")
    optim.add_argument("--ema-decay", type=float)
    book = train.add_argument_group("logging and checkpoints")
    book.add_argument("--log-every", type=int)
    book.add_argument("--eval-every", type=int, help="0 disables evaluation")
    book.add_argument("--eval-batches", type=int)
    book.add_argument("--ckpt-every", type=int)
    book.add_argument("--keep-checkpoints", type=int, help="number of newest checkpoints kept")
    train.set_defaults(handler=_run_train)

    sample = commands.add_parser("sample", help="generate text from a trained run",
                                 description="Sample from the newest checkpoint of a run (EMA weights) with its "
                                 "hyperschedule and a KV cache: ACS for ε-family runs, the analytic (τ-leaping) "
                                 "sampler for γ-family runs; --compare-cache also times it without the cache.")
    sample.add_argument("--run", required=True, help="the --out directory of `hdlm train`")
    sample.add_argument("--num-samples", type=int, default=4)
    sample.add_argument("--length", type=int, help="tokens per sample (default: the training seq_len)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--method", choices=["acs", "original", "analytic", "euler"],
                        help="acs (default) or original for ε-family runs; analytic (default) or euler for γ runs")
    sample.add_argument("--eta", type=float, default=0.01, help="ACS correction strength η")
    sample.add_argument("--temperature", type=float, default=1.0, help="of the ε samplers' draws (γ: 1 only)")
    sample.add_argument("--sampler-backend", default="auto", choices=["auto", "kernels", "reference"],
                        help="the sampling kernels: auto (the fused kernel of the device, default), kernels "
                        "(insist on it) or reference (PyTorch); every backend draws the same tokens")
    sample.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    sample.add_argument("--prompt", help="text the samples start with (frozen)")
    sample.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    sample.add_argument("--no-cache", action="store_true", help="do not use the KV cache")
    sample.add_argument("--compare-cache", action="store_true",
                        help="also generate without the KV cache; check the samples agree and report both speeds")
    sample.set_defaults(handler=_run_sample)

    prepare = commands.add_parser("prepare-bin", help="tokenize text files into a uint16 .bin token file",
                                  description="Byte-tokenize text files (one document each, EOS = 0 after "
                                  "each) into a nanoGPT-style .bin file, written atomically.")
    prepare.add_argument("sources", nargs="+", metavar="PATH", help="text files or directories of *.txt")
    prepare.add_argument("--out", required=True, help="the .bin file to write")
    prepare.set_defaults(handler=_run_prepare_bin)

    evaluate = commands.add_parser(
        "eval", help="perplexity upper bound (and sample entropy) of a trained run",
        description="Monte-Carlo upper bound on the validation NLL/perplexity of the newest checkpoint of a "
        "run (EMA weights), with the run's hyperschedule, attention layout and family bound (paper App. C.1, "
        "Alg. 1; only the terms of active positions, Remarks 1). See hdlm_reference.evaluate.")
    evaluate.add_argument("--run", required=True, help="the --out directory of `hdlm train`")
    evaluate.add_argument("--data", nargs="+", metavar="PATH",
                          help="one .bin token file, or text files / directories of *.txt; default: the "
                          "bundled corpus (the default data of `hdlm train`)")
    evaluate.add_argument("--val-fraction", type=float, default=0.05,
                          help="evaluate the last share of the data, the validation split `hdlm train` holds "
                          "out (default 0.05, its default)")
    evaluate.add_argument("--all-data", action="store_true",
                          help="evaluate all of --data (a held-out file) instead of its tail")
    evaluate.add_argument("--num-batches", type=int, help="at most this many batches (default: every chunk)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    evaluate.add_argument("--mc-samples", type=int, default=32,
                          help="Monte-Carlo draws per sequence, M of Alg. 1 (default 32; the paper uses "
                          "1000)")
    evaluate.add_argument("--time", choices=["continuous", "discrete"], default="continuous",
                          help="continuous-time bound (default), or the exact bound of the T-step original "
                          "sampler (epsilon family only)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--samples", type=int, default=0, metavar="N",
                          help="also generate N samples (ACS for epsilon runs, the analytic sampler for "
                          "gamma runs) and report their unigram entropy")
    evaluate.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    evaluate.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    evaluate.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    evaluate.set_defaults(handler=_run_eval)
    return parser


def build_training(args: argparse.Namespace) -> TrainingSetup:
    """Data, configuration, model and loss of ``hdlm train`` from its parsed arguments.

    Raises :class:`CliError` when ``hdlm_reference.model`` or ``hdlm_reference.losses`` is missing (checked
    first, before any data is read).
    """
    import torch

    model_module, losses_module = _import_model_and_losses()
    objective_module = importlib.import_module("hdlm_reference.objective")
    config = make_train_config(args)
    train_data, val_data, vocab_size = load_training_data(args, config.seq_len)
    if val_data is None:
        config = dataclasses.replace(config, eval_every=0)
    preset = PRESETS[args.preset]
    objective = objective_module.ObjectiveConfig(
        family=args.family, schedule=args.schedule, width=args.width, levels=args.levels, config=args.config,
        context=args.context, window=args.window, gamma=args.gamma, epsilon=args.epsilon, beta1=args.beta1,
        beta2=args.beta2, bos_id=vocab_size - 1 if args.config == "shifted" else None)
    try:
        objective.schedule_for(config.seq_len)  # validates width/levels against the length
        model_config = model_module.ModelConfig(vocab_size=vocab_size + 1, max_length=config.seq_len + 1,
                                                family=args.family, gamma=args.gamma, **preset.model)
    except (TypeError, ValueError) as error:
        raise CliError(str(error)) from None
    torch.manual_seed(config.seed)
    model = model_module.DiT(model_config)
    objective_class = objective_module.PackedObjective if args.objective == "packed" else objective_module.StepObjective
    loss_fn = objective_class(objective, model_config.vocab_size, config.seq_len, seed=config.seed)
    out = Path(config.out_dir)
    if _is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        from .atomic_file import atomic_write

        for name, value in ((MODEL_CONFIG_FILE, dataclasses.asdict(model_config)), (OBJECTIVE_FILE, objective.to_dict())):
            with atomic_write(out / name) as f:
                f.write(json.dumps(value, indent=2).encode("utf-8"))
    return TrainingSetup(model=model, loss_fn=loss_fn, train_data=train_data, val_data=val_data, config=config,
                         vocab_size=vocab_size, preset=preset)


def load_run(run_dir: str | Path, use_ema: bool = True):
    """``(model in eval mode, ObjectiveConfig, train config dict, checkpoint step)`` of a trained run."""
    from .checkpoint import latest_checkpoint, load_checkpoint
    from .model import DiT, ModelConfig
    from .objective import ObjectiveConfig

    run = Path(run_dir)
    for name in (MODEL_CONFIG_FILE, OBJECTIVE_FILE, "config.json"):
        if not (run / name).exists():
            raise CliError(f"{run} is not a run of `hdlm train` (no {name})")
    checkpoint = latest_checkpoint(run / "checkpoints")
    if checkpoint is None:
        raise CliError(f"{run} has no checkpoint yet (looked in {run / 'checkpoints'})")
    fields = json.loads((run / MODEL_CONFIG_FILE).read_text())
    model = DiT(ModelConfig(**fields))
    state = load_checkpoint(checkpoint)
    model.load_state_dict(state["model"])
    if use_ema:
        model.load_state_dict(state["ema"]["shadow"], strict=False)
    objective = ObjectiveConfig(**json.loads((run / OBJECTIVE_FILE).read_text()))
    return model.eval(), objective, json.loads((run / "config.json").read_text()), int(state["step"])


def make_train_config(args: argparse.Namespace):
    """The ``TrainConfig`` of ``hdlm train``: options given, else the preset's values, else the defaults."""
    from .trainer import TrainConfig

    fields = {**PRESETS[args.preset].train, "out_dir": f"runs/{args.preset}"}
    for name in ("total_steps", "out_dir", "seed", "device", "bf16", "deterministic", "progress",
                 "batch_size", "seq_len", "grad_accum_steps", "lr", "min_lr_ratio", "warmup_steps", "betas",
                 "weight_decay", "grad_clip", "ema_decay", "log_every", "eval_every", "eval_batches",
                 "ckpt_every", "keep_checkpoints"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if fields.get("grad_clip") == 0:
        fields["grad_clip"] = None
    try:
        return TrainConfig(**fields)
    except ValueError as error:
        raise CliError(str(error)) from None


def load_training_data(args: argparse.Namespace, seq_len: int):
    """``(train TokenDataset, val TokenDataset or None, vocab size without MASK)`` of ``hdlm train``."""
    from .data import TokenDataset, bundled_corpus_path, load_tokens, split_train_val
    from .tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    sources = args.data or [bundled_corpus_path()]
    is_bin = any(Path(s).suffix == ".bin" for s in sources)
    if args.vocab_size is not None and not is_bin:
        raise CliError(f"--vocab-size applies to .bin data only; text is byte-tokenized (256 ids), "
                       f"got --vocab-size {args.vocab_size}")
    vocab_size = args.vocab_size if args.vocab_size is not None else tokenizer.num_bytes
    try:
        tokens = load_tokens(sources, tokenizer)
        if args.val_data:
            train_tokens, val_tokens = tokens, load_tokens(args.val_data, tokenizer)
        else:
            train_tokens, val_tokens = split_train_val(tokens, args.val_fraction)
        train_data = TokenDataset(train_tokens, seq_len)
        val_data = TokenDataset(val_tokens, seq_len) if len(val_tokens) else None
    except (FileNotFoundError, ValueError) as error:
        raise CliError(str(error)) from None
    return train_data, val_data, vocab_size


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hdlm`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CliError as error:
        print(f"hdlm: error: {error}", file=sys.stderr)
        return 2


def _run_train(args: argparse.Namespace) -> int:
    from .trainer import train

    setup = build_training(args)
    summary = train(setup.model, setup.loss_fn, setup.train_data, setup.config,
                    resume=not args.no_resume, val_data=setup.val_data)
    if _is_main_process():
        print(json.dumps(dataclasses.asdict(summary), indent=2))
    return 0


def _run_sample(args: argparse.Namespace) -> int:
    import torch

    import hdlm_kernels as hk

    from .generate import generate
    from .tokenizer import ByteTokenizer

    model, objective, train_config, step = load_run(args.run, use_ema=not args.no_ema)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise CliError(f"--device: {error}") from None
    model = model.to(device)
    length = args.length or int(train_config["seq_len"])
    method = args.method or ("acs" if objective.family == "epsilon" else "analytic")
    allowed = ("acs", "original") if objective.family == "epsilon" else ("analytic", "euler")
    if method not in allowed:
        raise CliError(f"--method {method} does not sample a {objective.family}-family run; use one of "
                       f"{', '.join(allowed)}")
    tokenizer = ByteTokenizer()
    sched = objective.schedule_for(length)
    prompt = None
    if args.prompt:
        ids = tokenizer.encode(args.prompt)[:length]
        prompt = torch.tensor([ids], dtype=torch.long)
    kwargs = dict(method=method, eta=args.eta, temperature=args.temperature, prompt=prompt,
                  config=objective.config, context=objective.attention_context, window=objective.window,
                  bos_id=objective.bos_id, sampler_backend=args.sampler_backend, device=device)
    use_cache = not args.no_cache and hk.masks.kv_cacheable(sched, objective.config, objective.attention_context)
    try:
        result = generate(model, sched, args.num_samples, args.seed, kv_cache=use_cache, progress=True, **kwargs)
    except (ValueError, RuntimeError) as error:  # e.g. a temperature for a γ run, or no fused kernel here
        raise CliError(str(error)) from None
    print(f"checkpoint step {step}, {sched!r}, method {method}, KV cache {'on' if use_cache else 'off'}")
    for i, row in enumerate(result.tokens.tolist()):
        print(f"--- sample {i}\n{tokenizer.decode(row)}")
    print(f"{result.tokens.numel()} tokens in {result.seconds:.2f} s ({result.tokens_per_second():.1f} tokens/s), "
          f"{result.model_calls} model calls, {result.rows_fed} rows fed")
    if args.compare_cache:
        other = generate(model, sched, args.num_samples, args.seed, kv_cache=not use_cache, **kwargs)
        cached, uncached = (result, other) if use_cache else (other, result)
        same = torch.equal(cached.tokens, uncached.tokens)
        print(f"with KV cache: {cached.tokens_per_second():.1f} tokens/s ({cached.rows_fed} rows fed); "
              f"without: {uncached.tokens_per_second():.1f} tokens/s ({uncached.rows_fed} rows fed); "
              f"speed-up {cached.tokens_per_second() / uncached.tokens_per_second():.2f}x; "
              f"identical samples: {same}")
        if not same:
            raise CliError("cached and uncached generation differ")
    return 0


def _run_prepare_bin(args: argparse.Namespace) -> int:
    from .data import prepare_bin
    from .tokenizer import ByteTokenizer

    try:
        count = prepare_bin(args.sources, args.out, ByteTokenizer())
    except (FileNotFoundError, ValueError) as error:
        raise CliError(str(error)) from None
    print(f"wrote {count} tokens to {args.out}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import hdlm_kernels as hk

    from .data import TokenDataset, bundled_corpus_path, load_tokens, split_train_val
    from .evaluate import bound_options, perplexity_bound, token_batches, unigram_entropy
    from .generate import generate
    from .tokenizer import ByteTokenizer

    for name in ("batch_size", "mc_samples"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_batches is not None and args.num_batches < 1:
        raise CliError(f"--num-batches must be >= 1, got {args.num_batches}")
    if args.samples < 0:
        raise CliError(f"--samples must be >= 0, got {args.samples}")
    if not args.all_data and not 0.0 < args.val_fraction < 1.0:
        raise CliError(f"--val-fraction must lie in (0, 1), got {args.val_fraction} (use --all-data for the "
                       "whole data)")
    model, objective, train_config, step = load_run(args.run, use_ema=not args.no_ema)
    if args.time == "discrete" and objective.family != "epsilon":
        raise CliError("--time discrete is defined for epsilon-family runs only (the γ DWDSE bound is "
                       "continuous-time)")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise CliError(f"--device: {error}") from None
    model = model.to(device)
    seq_len = int(train_config["seq_len"])
    num_tokens = model.config.vocab_size - 1
    sources = args.data or [bundled_corpus_path()]
    try:
        tokens = load_tokens(sources, ByteTokenizer())
        split = tokens if args.all_data else split_train_val(tokens, args.val_fraction)[1]
        if len(split) and int(np.max(split)) >= num_tokens:
            raise ValueError(f"the data holds token id {int(np.max(split))}, but the model knows ids "
                             f"[0, {num_tokens}) (MASK = {num_tokens})")
        dataset = TokenDataset(np.asarray(split), seq_len)
        batches = token_batches(dataset, args.batch_size, args.num_batches)
    except (FileNotFoundError, ValueError) as error:
        raise CliError(str(error)) from None
    sched = objective.schedule_for(seq_len)
    options = bound_options(objective)
    result = perplexity_bound(model, batches, sched, num_samples=args.mc_samples, seed=args.seed,
                              progress=args.progress, time=args.time, **options)
    entropy = None
    if args.samples:
        use_cache = hk.masks.kv_cacheable(sched, objective.config, objective.attention_context)
        method = "acs" if objective.family == "epsilon" else "analytic"
        samples = generate(model, sched, args.samples, args.seed, method=method, kv_cache=use_cache,
                           config=objective.config, context=objective.attention_context,
                           window=objective.window, bos_id=objective.bos_id, device=device)
        entropy = unigram_entropy(samples.tokens.cpu(), exclude=model.config.mask_id)

    where = "all of" if args.all_data else f"last {args.val_fraction:g} of"
    data_name = ", ".join(str(s) for s in sources)
    print(f"run {args.run}, checkpoint step {step} ({'raw' if args.no_ema else 'EMA'} weights)")
    print(f"{objective.family} family, {objective.config}, context {objective.attention_context}, {sched!r}")
    print(f"data: {where} {data_name}: {result.num_sequences} sequences of {seq_len} tokens")
    rows = [("NLL upper bound (nats/token)", f"{result.nll:.4f} ± {result.mc_stderr:.4f} (MC s.e.)"),
            ("perplexity upper bound", f"{result.perplexity:.4f}"),
            ("bits per token", f"{result.bits_per_token:.4f}"),
            ("prior term (nats/token)", f"{result.prior:.4f}"),
            ("MC draws per sequence", f"{result.num_samples} ({result.time} time)")]
    if entropy is not None:
        rows.append((f"unigram entropy of {args.samples} samples (nats)",
                     f"{entropy.mean:.4f} ± {entropy.std:.4f}"))
    width = max(len(name) for name, _ in rows)
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * max(len(value) for _, value in rows)}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _import_model_and_losses():
    modules = []
    for name in ("hdlm_reference.model", "hdlm_reference.losses"):
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as error:
            if error.name != name:
                raise  # the module exists but one of its own imports is missing: show that traceback
            raise CliError(f"hdlm train needs the module {name}, which this installation does not have "
                           f"(the reference model and losses are not part of it yet)") from None
    return modules


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    sys.exit(main())
