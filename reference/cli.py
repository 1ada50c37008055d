"""The ``hdlm`` command: ``hdlm train``, ``hdlm sample``, ``hdlm eval`` and ``hdlm prepare-bin``.

``hdlm train`` builds everything through :func:`build_training` (data, configuration, model, loss) and
hands it to :func:`hdlm_reference.trainer.train`; under ``torchrun`` every rank runs the same command.
The model and the losses come from ``hdlm_reference.model`` and ``hdlm_reference.losses``, imported only
when ``train`` runs, so ``hdlm --help`` works without them and ``hdlm train`` says clearly when they are
missing.

Examples::

    hdlm train --preset tiny --steps 200 --out runs/tiny            # bundled corpus, byte tokenizer
    hdlm sample --run runs/tiny --num-samples 4 --compare-cache      # τ_Block + KV cache + ACS
    hdlm sample --model hdlm-group/hdlm-base-gamma-0.01 --prompt "The" --out samples.jsonl
    hdlm eval --model hdlm-group/hdlm-base-epsilon-0.01 --dataset wikitext103 --device cuda
    hdlm prepare-bin my_texts/ --out data/corpus.bin                 # text -> nanoGPT-style uint16 tokens
    hdlm prepare-bin --dataset openwebtext --tokenizer gpt2 --out data/owt.bin --shard-tokens 100000000
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

MODEL_CONFIG_FILE = "model_config.json"  # the names hdlm_reference.pretrained reads
OBJECTIVE_FILE = "objective.json"


@dataclass(frozen=True)
class Preset:
    """Default training hyperparameters (``TrainConfig`` fields) and model sizes of a named setup.

    ``model`` holds ``hdlm_reference.model.ModelConfig`` fields (``hidden_size``, ``num_layers``,
    ``num_heads``, ``cond_dim``, ``dropout``; paper sizes from docs/official-code.md §4), for
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


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default in its help (``--help`` says what an option left out means), except
    for defaults that carry no information (None, False) and help texts that state the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is argparse.SUPPRESS
                or action.nargs == 0 or not action.option_strings):  # nargs 0: a flag
            return text
        return f"{text} (default: %(default)s)"


def _backend_name(op: str, flag: str):
    """An argparse ``type`` that accepts the backend names of ``op`` (``hdlm_kernels.backends``) and refuses
    any other with the registry's message, at parse time (imports the package only when the flag is given)."""

    def check(value: str) -> str:
        import hdlm_kernels as hk

        try:
            return hk.backends.check_name(op, value, flag)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    check.__name__ = f"{op} backend"
    return check


BACKEND_HELP = ("auto (the fused kernel of the device when there is one, else the reference), kernels (insist on "
                "it), reference, or an implementation name; `python -c 'import hdlm_kernels as hk; "
                "print(hk.info())'` lists them per op")


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("model (one of --run / --model)")
    which = source.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="the --out directory of `hdlm train`")
    which.add_argument("--model", metavar="ID_OR_PATH",
                       help="a published model's hub id (e.g. hdlm-group/hdlm-base-gamma-0.01; read from the local "
                       "Hugging Face cache when HF_HUB_OFFLINE is set), a directory in the hub layout, an official "
                       "training checkpoint (.pth) or run directory, or an `hdlm train` run")
    source.add_argument("--checkpoint", help="a run's checkpoint file to use instead of its newest intact one")
    source.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    source.add_argument("--no-ema", action="store_true", help="the raw weights of a training checkpoint "
                        "instead of its EMA")
    source.add_argument("--dtype", choices=sorted(_DTYPES), help="model dtype (default: as stored, float32)")
    source.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    source.add_argument("--conditioning", choices=["paper", "official"],
                        help="σ̄ fed to γ models: the model's own by default (official for published checkpoints)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hdlm", description="Hyperschedule diffusion LMs: reference harness (hdlm-kernels).",
        formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a model (resumes from the newest checkpoint in --out)",
                                formatter_class=_HelpFormatter,
                                description="Train with the reference trainer (AdamW, warmup + cosine, EMA, "
                                "torchrun DDP, atomic checkpoints, exact resume). Options left out take the "
                                "preset's value, then TrainConfig's default. Resuming with another model, "
                                "objective, batch size, length or tokenizer is refused.")
    data = train.add_argument_group("data")
    data.add_argument("--data", nargs="+", metavar="PATH",
                      help="one .bin token file (written by `hdlm prepare-bin` with the same --tokenizer), or "
                      "text files / directories of *.txt (one document per file); default: the bundled corpus")
    data.add_argument("--val-data", nargs="+", metavar="PATH",
                      help="validation data in the same form; default: the tail of --data (--val-fraction)")
    data.add_argument("--val-fraction", type=float, default=0.05,
                      help="share of --data kept for validation when --val-data is not given (0 disables "
                      "evaluation)")
    data.add_argument("--tokenizer", default="byte",
                      help="byte, a directory with tokenizer.json (or vocab.json + merges.txt), tiktoken:NAME|DIR, "
                      "or a hub id in the local cache (e.g. gpt2); recorded in the run")
    data.add_argument("--vocab-size", type=int,
                      help="token ids in a .bin file, MASK excluded (a check: it must equal the tokenizer's)")
    run = train.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size and defaults")
    run.add_argument("--steps", type=int, dest="total_steps", help="optimizer steps in total")
    run.add_argument("--out", dest="out_dir", help="output directory (default runs/PRESET)")
    run.add_argument("--no-resume", action="store_true",
                     help="refuse to start if --out already holds checkpoints (default: resume from the "
                     "newest)")
    run.add_argument("--seed", type=int)
    run.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    run.add_argument("--attention-backend", default="reference",
                     type=_backend_name("attention", "--attention-backend"),
                     help="the attention kernels of training: " + BACKEND_HELP)
    run.add_argument("--no-bf16", dest="bf16", action="store_false", default=None,
                     help="no bf16 autocast on CUDA")
    run.add_argument("--deterministic", action="store_true", default=None,
                     help="deterministic kernels (bit-exact resumes on CUDA)")
    run.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                     help="no progress bar")
    diffusion = train.add_argument_group("diffusion (what is trained; saved with the run for `hdlm sample`)")
    diffusion.add_argument("--objective", choices=["packed", "step"], default="packed",
                           help="interval-packed training (App. B.3) or one hyperschedule step per batch (the "
                           "official code's style)")
    diffusion.add_argument("--family", choices=["epsilon", "gamma"], default="epsilon",
                           help="ε-hybrid (HDCE, no σ conditioning) or γ-hybrid (DWDSE, adaLN on σ̄)")
    diffusion.add_argument("--schedule", choices=["block", "slide"], default="block", help="hyperschedule")
    diffusion.add_argument("--width", type=int, default=16, help="window width ω")
    diffusion.add_argument("--levels", type=int, help="noise levels 𝒯 (default: the width, ρ = 1)")
    diffusion.add_argument("--config", choices=["aligned", "shifted"], default="aligned", help="ALIGNED or SHIFTED")
    diffusion.add_argument("--context", choices=["causal", "block_causal", "full"],
                           help="attention among settled tokens (default block_causal for block, causal for slide)")
    diffusion.add_argument("--window", choices=["full", "causal"], default="full", help="attention inside the window")
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

    sample = commands.add_parser("sample", help="generate text from a trained run or a published model",
                                 formatter_class=_HelpFormatter,
                                 description="Sample with the model's hyperschedule (or the one given) and a KV "
                                 "cache where it is exact: ACS for ε-family models, the analytic (τ-leaping) "
                                 "sampler for γ-family models. Prints the decoded samples and a one-line summary; "
                                 "--out also writes them as JSON lines.")
    _add_model_source(sample)
    sample.add_argument("--num-samples", type=int, default=4, help="number of samples")
    sample.add_argument("--length", type=int, help="tokens per sample (default: the training length)")
    sample.add_argument("--prompt", help="text the samples start with (frozen; must be shorter than --length)")
    sample.add_argument("--out", help="also write the samples to this .jsonl file (one JSON object per sample)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the draws")
    sampling = sample.add_argument_group("schedule and sampler (default: the model's training schedule)")
    sampling.add_argument("--schedule", choices=["block", "slide", "flat"], help="hyperschedule")
    sampling.add_argument("--width", type=int, help="window width ω (block, slide)")
    sampling.add_argument("--levels", type=int, help="noise levels 𝒯 per window")
    sampling.add_argument("--steps", type=int, help="model steps in total (flat: 𝒯; block: 𝒯 · number of blocks)")
    sampling.add_argument("--method", choices=["acs", "original", "analytic", "euler"],
                          help="acs (default) or original for ε-family models; analytic (default) or euler for γ")
    sampling.add_argument("--eta", type=float, default=0.01, help="ACS correction strength η")
    sampling.add_argument("--temperature", type=float, default=1.0, help="of the ε samplers' draws (γ: 1 only)")
    sampling.add_argument("--sampler-backend", default="auto", type=_backend_name("gumbel_argmax", "--sampler-backend"),
                          help="the sampling kernels (gumbel_argmax / hybrid_step): " + BACKEND_HELP
                          + "; every backend draws the same tokens")
    sampling.add_argument("--attention-backend", type=_backend_name("decode", "--attention-backend"),
                          help="the attention kernels of the model's calls (decode with the KV cache, attention "
                          "without; default: the model's own): " + BACKEND_HELP)
    sampling.add_argument("--no-cache", action="store_true", help="do not use the KV cache")
    sampling.add_argument("--compare-cache", action="store_true",
                          help="also generate without the KV cache; check the samples agree and report both speeds")
    sample.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    sample.set_defaults(handler=_run_sample)

    prepare = commands.add_parser("prepare-bin", help="tokenize text into uint16 .bin token files",
                                  formatter_class=_HelpFormatter,
                                  description="Tokenize text files or a local `datasets` dataset (one document "
                                  "each, <|endoftext|> / EOS after each) into nanoGPT-style uint16 .bin files, in "
                                  "parallel worker processes, written atomically.")
    prepare.add_argument("sources", nargs="*", metavar="PATH", help="text files or directories of *.txt")
    prepare.add_argument("--dataset", metavar="NAME_OR_PATH",
                         help="instead of PATHs: a dataset saved with save_to_disk, a .jsonl file, a hub dataset in "
                         f"the local cache, or one of {', '.join(sorted(_named_datasets()))}")
    prepare.add_argument("--dataset-config", help="config of a hub dataset (e.g. wikitext-103-raw-v1)")
    prepare.add_argument("--split", help="split of --dataset (datasets slicing works, e.g. train[:-100000])")
    prepare.add_argument("--text-field", help="column holding the text (default: text, or the named set's)")
    prepare.add_argument("--detokenizer", choices=["none", "wikitext", "ptb", "lambada"],
                         help="undo the source's tokenization first (default: the named set's, else none)")
    prepare.add_argument("--tokenizer", default="byte",
                         help="byte, a tokenizer directory, tiktoken:NAME|DIR, or a hub id in the local cache")
    prepare.add_argument("--out", required=True, help="the .bin file to write (with --shard-tokens: its stem)")
    prepare.add_argument("--shard-tokens", type=int,
                         help="start a new shard STEM_00001.bin, ... after about this many tokens (default: one file)")
    prepare.add_argument("--workers", type=int, default=_default_workers(), help="tokenizer processes")
    prepare.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    prepare.set_defaults(handler=_run_prepare_bin)

    evaluate = commands.add_parser(
        "eval", help="perplexity upper bound (and sample entropy) of a run or a published model",
        formatter_class=_HelpFormatter,
        description="Monte-Carlo upper bound on the NLL/perplexity (paper App. C.1, Alg. 1; only the terms of "
        "active positions, Remarks 1) with the model's hyperschedule, attention layout and family bound, on "
        "--dataset (the paper's zero-shot sets with the official detokenization, length = the model's) or "
        "--data. See hdlm_reference.evaluate.")
    _add_model_source(evaluate)
    evaluate.add_argument("--dataset", metavar="NAME_OR_PATH",
                          help=f"{'|'.join(sorted(_named_datasets()))}, or a path (text files, .jsonl, .bin, a "
                          "saved dataset): scored whole, tokenized with the model's tokenizer")
    evaluate.add_argument("--split", help="split of a --dataset (default: the set's, as the official evaluation)")
    evaluate.add_argument("--data", nargs="+", metavar="PATH",
                          help="one .bin token file, or text files / directories of *.txt; default: the "
                          "bundled corpus (the default data of `hdlm train`)")
    evaluate.add_argument("--val-fraction", type=float, default=0.05,
                          help="evaluate the last share of --data, the validation split `hdlm train` holds out")
    evaluate.add_argument("--all-data", action="store_true",
                          help="evaluate all of --data (a held-out file) instead of its tail")
    evaluate.add_argument("--length", type=int, help="tokens per sequence (default: the model's training length)")
    evaluate.add_argument("--num-batches", type=int, help="at most this many batches (default: every chunk)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    evaluate.add_argument("--mc-samples", type=int, default=32,
                          help="Monte-Carlo draws per sequence, M of Alg. 1 (the paper uses 1000)")
    evaluate.add_argument("--time", choices=["continuous", "discrete"], default="continuous",
                          help="continuous-time bound, or the exact bound of the T-step original sampler "
                          "(epsilon family only)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws")
    evaluate.add_argument("--samples", type=int, default=0, metavar="N",
                          help="also generate N samples (ACS for epsilon models, the analytic sampler for "
                          "gamma models) and report their unigram entropy")
    evaluate.add_argument("--workers", type=int, default=_default_workers(), help="tokenizer processes for --dataset")
    evaluate.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    evaluate.set_defaults(handler=_run_eval)
    return parser


def _default_workers() -> int:
    import os

    return max(1, min(8, os.cpu_count() or 1))


def _named_datasets() -> tuple[str, ...]:
    return ("lambada", "openwebtext", "ptb", "wikitext103", "wikitext2")


def build_training(args: argparse.Namespace) -> TrainingSetup:
    """Data, configuration, model and loss of ``hdlm train`` from its parsed arguments.

    Raises :class:`CliError` when ``hdlm_reference.model`` or ``hdlm_reference.losses`` is missing (checked
    first, before any data is read), and, before anything is written, when ``--out`` holds checkpoints of a
    run that this command would continue with another model, objective, batch size, length or tokenizer.
    """
    import torch

    model_module, losses_module = _import_model_and_losses()
    objective_module = importlib.import_module("hdlm_reference.objective")
    config = make_train_config(args)
    tokenizer = _tokenizer(args.tokenizer)
    train_data, val_data, vocab_size = load_training_data(args, config.seq_len, tokenizer)
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
                                                family=args.family, gamma=args.gamma,
                                                attention_backend=args.attention_backend, **preset.model)
    except (TypeError, ValueError) as error:
        raise CliError(f"{error} (--seq-len {config.seq_len}, --width {args.width}, --levels {args.levels})") from None
    out = Path(config.out_dir)
    if _is_main_process():
        _check_resume(out, args, dataclasses.asdict(model_config), objective.to_dict(), config, tokenizer)
    torch.manual_seed(config.seed)
    model = model_module.DiT(model_config)
    objective_class = objective_module.PackedObjective if args.objective == "packed" else objective_module.StepObjective
    loss_fn = objective_class(objective, model_config.vocab_size, config.seq_len, seed=config.seed)
    if _is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        from .atomic_file import atomic_write
        from .tokenizer_spec import save_tokenizer

        for name, value in ((MODEL_CONFIG_FILE, dataclasses.asdict(model_config)), (OBJECTIVE_FILE, objective.to_dict())):
            with atomic_write(out / name) as f:
                f.write(json.dumps(value, indent=2).encode("utf-8"))
        save_tokenizer(tokenizer, out)
    return TrainingSetup(model=model, loss_fn=loss_fn, train_data=train_data, val_data=val_data, config=config,
                         vocab_size=vocab_size, preset=preset)


# Settings a resumed run must keep: what it trains, and what its data stream and sampler state depend on.
_RESUME_TRAIN_FIELDS = ("batch_size", "seq_len")


def _check_resume(out: Path, args, model_config: dict, objective: dict, config, tokenizer) -> None:
    """Refuse (before anything is written) to continue the run in ``out`` with other settings."""
    from .checkpoint import list_checkpoints
    from .tokenizer_spec import SPEC_FILE, TOKENIZER_DIR, tokenizer_summary

    checkpoints = list_checkpoints(out / "checkpoints")
    if not checkpoints:
        return
    if args.no_resume:
        raise CliError(f"--no-resume, but {out} already holds checkpoints (newest {checkpoints[-1][1].name}); "
                       "choose another --out")
    changes = []

    def compare(name: str, saved: dict, new: dict, fields=None):
        for key in fields or sorted(set(saved) | set(new)):
            if key in ("attention_backend", "decode_backend"):
                continue  # how attention runs, not what is trained
            old, now = saved.get(key), new.get(key)
            if _normalize_value(old) != _normalize_value(now):
                changes.append(f"{name}.{key}: {old!r} -> {now!r}")

    for file_name, new in ((MODEL_CONFIG_FILE, model_config), (OBJECTIVE_FILE, objective)):
        path = out / file_name
        if path.is_file():
            compare(file_name.removesuffix(".json"), json.loads(path.read_text()), new)
    train_path = out / "config.json"
    if train_path.is_file():
        compare("train", json.loads(train_path.read_text()), dataclasses.asdict(config), _RESUME_TRAIN_FIELDS)
    spec_path = out / TOKENIZER_DIR / SPEC_FILE
    saved_tokenizer = json.loads(spec_path.read_text()) if spec_path.is_file() else tokenizer_summary(_byte())
    compare("tokenizer", saved_tokenizer, tokenizer_summary(tokenizer), ("kind", "num_tokens", "eos_id"))
    if changes:
        raise CliError(f"{out} holds a run (newest checkpoint {checkpoints[-1][1].name}) that these options would "
                       f"change: {'; '.join(changes)}. Resume with its settings, or choose another --out")


def _normalize_value(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _byte():
    from .tokenizer import ByteTokenizer

    return ByteTokenizer()


def _tokenizer(spec: str):
    from .tokenizer_spec import TokenizerUnavailableError, load_tokenizer

    try:
        return load_tokenizer(spec)
    except TokenizerUnavailableError as error:
        raise CliError(f"--tokenizer {spec}: {error}") from None


def load_run(run_dir, use_ema: bool = True, checkpoint=None):
    """The :class:`hdlm_reference.pretrained.Pretrained` of an ``hdlm train`` run (library errors)."""
    from .pretrained import load_run as load

    return load(run_dir, ema=use_ema, checkpoint=checkpoint)


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
    if fields.get("device", "auto") != "auto":
        _device(fields["device"])
    try:
        return TrainConfig(**fields)
    except ValueError as error:
        raise CliError(str(error)) from None


def load_training_data(args: argparse.Namespace, seq_len: int, tokenizer=None):
    """``(train TokenDataset, val TokenDataset or None, vocab size without MASK)`` of ``hdlm train``:
    text is tokenized with ``tokenizer`` (default byte); a .bin must hold that tokenizer's ids."""
    from .data import TokenDataset, bundled_corpus_path, load_tokens, split_train_val

    tokenizer = tokenizer if tokenizer is not None else _byte()
    num_tokens = tokenizer.vocab_size - 1
    sources = args.data or [bundled_corpus_path()]
    is_bin = any(Path(s).suffix == ".bin" for s in sources)
    spec = getattr(args, "tokenizer", "byte")
    if args.vocab_size is not None and not is_bin:
        raise CliError(f"--vocab-size applies to .bin data only; text is tokenized by --tokenizer {spec} "
                       f"({num_tokens} ids), got --vocab-size {args.vocab_size}")
    if args.vocab_size is not None and args.vocab_size != num_tokens:
        raise CliError(f"--vocab-size {args.vocab_size} but --tokenizer {spec} has {num_tokens} token ids: pass "
                       "the tokenizer that wrote the .bin file (e.g. --tokenizer DIR with its tokenizer.json), so "
                       "that `hdlm sample` and `hdlm eval` can decode and score the run")
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
    return train_data, val_data, num_tokens


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

    from .checkpoint import CheckpointReadError

    setup = build_training(args)
    try:
        summary = train(setup.model, setup.loss_fn, setup.train_data, setup.config,
                        resume=not args.no_resume, val_data=setup.val_data)
    except CheckpointReadError as error:  # every checkpoint of the run is unreadable
        raise CliError(str(error)) from None
    if _is_main_process():
        print(json.dumps(dataclasses.asdict(summary), indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# sample / eval: the model, its device and its schedule
# ---------------------------------------------------------------------------------------------

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float64": "float64"}


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CliError(f"--device {name}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                       f"{'no CUDA build' if torch.version.cuda is None else 'no visible GPU'}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CliError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _load_model(args: argparse.Namespace):
    """The :class:`Pretrained` of --run / --model with --checkpoint, --no-ema, --device, --dtype, --revision."""
    import torch

    from .pretrained import PretrainedError, load_pretrained, load_run

    device = _device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    source = args.run if args.run is not None else args.model
    if args.checkpoint is not None and not Path(source).is_dir():
        raise CliError("--checkpoint picks a checkpoint of a run directory; --model/--run is not one")
    try:
        if args.run is not None:
            pretrained = load_run(args.run, ema=not args.no_ema, checkpoint=args.checkpoint, device=device,
                                  dtype=dtype)
        else:
            pretrained = load_pretrained(source, device=device, dtype=dtype, revision=args.revision,
                                         ema=not args.no_ema, checkpoint=args.checkpoint)
    except PretrainedError as error:
        raise CliError(str(error)) from None
    if args.conditioning is not None:
        pretrained.conditioning = pretrained.model.conditioning = args.conditioning
    return pretrained


def _sampling_schedule(args: argparse.Namespace, pretrained, length: int):
    """The hyperschedule of ``hdlm sample``: the model's, with --schedule/--width/--levels/--steps."""
    import hdlm_kernels as hk

    objective = pretrained.objective
    kind = args.schedule or ("flat" if objective.width >= pretrained.length and objective.schedule == "block"
                             else objective.schedule)
    levels = args.levels or objective.levels or objective.width
    try:
        if kind == "flat":
            if args.width is not None:
                raise CliError("--width does not apply to --schedule flat (one window over the whole length)")
            return hk.schedules.flat(length, args.steps or levels)
        width = args.width or objective.width
        if width > length:
            raise CliError(f"--length {length} is smaller than the window width {width}; pass a longer --length "
                           "or a --width of at most the length")
        if kind == "slide":
            if args.steps is not None:
                raise CliError("--steps applies to flat and block schedules (a slide takes ω - 1 + ⌈d/ρ⌉ steps); "
                               "use --levels")
            return hk.schedules.slide(length, width, levels)
        if args.steps is not None:
            blocks = -(-length // width)
            if args.steps % blocks:
                raise CliError(f"--steps {args.steps} is not a multiple of the {blocks} blocks of width {width} "
                               f"over {length} tokens")
            levels = args.steps // blocks
        return hk.schedules.block(length, width, levels)
    except (TypeError, ValueError) as error:
        raise CliError(f"schedule: {error}") from None


def _run_sample(args: argparse.Namespace) -> int:
    import torch

    import hdlm_kernels as hk

    from .generate import generate

    if args.num_samples < 1:
        raise CliError(f"--num-samples must be >= 1, got {args.num_samples}")
    pretrained = _load_model(args)
    model, tokenizer, objective = pretrained.model, pretrained.tokenizer, pretrained.objective
    length = args.length or pretrained.length
    if length < 1 or length > model.config.max_length:
        raise CliError(f"--length must lie in [1, {model.config.max_length}] (the model's max_length), got {length}")
    method = args.method or ("acs" if pretrained.family == "epsilon" else "analytic")
    allowed = ("acs", "original") if pretrained.family == "epsilon" else ("analytic", "euler")
    if method not in allowed:
        what = "run" if pretrained.kind == "run" else "model"
        raise CliError(f"--method {method} does not sample a {pretrained.family}-family {what}; use one of "
                       f"{', '.join(allowed)}")
    sched = _sampling_schedule(args, pretrained, length)
    prompt, prompt_tokens = None, 0
    if args.prompt:
        ids = tokenizer.encode(args.prompt)
        if len(ids) >= length:
            raise CliError(f"--prompt is {len(ids)} tokens long, which leaves nothing to generate in --length "
                           f"{length}; pass a longer --length or a shorter prompt")
        prompt, prompt_tokens = torch.tensor([ids], dtype=torch.long), len(ids)
    options = pretrained.sample_options()
    options.update(method=method, eta=args.eta, temperature=args.temperature, prompt=prompt,
                   sampler_backend=args.sampler_backend, attention_backend=args.attention_backend,
                   device=model.vocab_embed.embedding.device)
    use_cache = not args.no_cache and hk.masks.kv_cacheable(sched, objective.config, objective.attention_context)
    try:
        result = generate(model, sched, args.num_samples, args.seed, kv_cache=use_cache, progress=args.progress,
                          **options)
    except (ValueError, RuntimeError) as error:  # e.g. a temperature for a γ model, or no fused kernel here
        raise CliError(str(error)) from None
    texts = [tokenizer.decode(row) for row in result.tokens.tolist()]
    print(pretrained.describe())
    for i, text in enumerate(texts):
        print(f"--- sample {i}\n{text}")
    if args.out:
        _write_samples(Path(args.out), texts, result.tokens, args, pretrained, sched, method)
    generated = args.num_samples * (length - prompt_tokens)
    seconds = max(result.seconds, 1e-12)
    print(f"{args.num_samples} samples x {length} tokens ({generated} generated) in {result.seconds:.2f} s "
          f"({generated / seconds:.1f} tokens/s); {sched.kind} ω={sched.width} 𝒯={sched.num_levels}, "
          f"{result.model_calls} model calls, method {method}, KV cache {'on' if use_cache else 'off'}, "
          f"{pretrained.conditioning} conditioning" + (f", written to {args.out}" if args.out else ""))
    if args.compare_cache:
        other = generate(model, sched, args.num_samples, args.seed, kv_cache=not use_cache, **options)
        cached, uncached = (result, other) if use_cache else (other, result)
        same = torch.equal(cached.tokens, uncached.tokens)
        print(f"with KV cache: {cached.tokens_per_second():.1f} tokens/s ({cached.rows_fed} rows fed); "
              f"without: {uncached.tokens_per_second():.1f} tokens/s ({uncached.rows_fed} rows fed); "
              f"speed-up {cached.tokens_per_second() / uncached.tokens_per_second():.2f}x; "
              f"identical samples: {same}")
        if not same:
            raise CliError("cached and uncached generation differ")
    return 0


def _write_samples(path: Path, texts, tokens, args, pretrained, sched, method) -> None:
    from .atomic_file import atomic_write

    lines = []
    for i, (text, row) in enumerate(zip(texts, tokens.tolist())):
        lines.append(json.dumps({"index": i, "text": text, "tokens": row, "prompt": args.prompt, "seed": args.seed,
                                 "model": pretrained.source, "method": method, "schedule": sched.kind,
                                 "width": sched.width, "levels": sched.num_levels, "steps": sched.num_steps,
                                 "temperature": args.temperature, "conditioning": pretrained.conditioning},
                                ensure_ascii=False))
    try:
        with atomic_write(path) as f:
            f.write(("\n".join(lines) + "\n").encode("utf-8"))
    except OSError as error:
        raise CliError(f"--out {path}: {error}") from None


def _run_prepare_bin(args: argparse.Namespace) -> int:
    from .text_datasets import (DatasetUnavailableError, load_documents, resolve_source, tokenize_documents,
                                write_bin_shards)
    from .tokenizer_spec import spec_of

    if bool(args.sources) == bool(args.dataset):
        raise CliError("give text PATHs or --dataset (one of the two)")
    if args.workers < 1:
        raise CliError(f"--workers must be >= 1, got {args.workers}")
    tokenizer = _tokenizer(args.tokenizer)
    if tokenizer.vocab_size - 1 > 1 << 16:
        raise CliError(f"--tokenizer {args.tokenizer} has {tokenizer.vocab_size - 1} ids, more than uint16 holds")
    try:
        if args.dataset:
            source = resolve_source(args.dataset, split=args.split, field=args.text_field,
                                    detokenizer=args.detokenizer, config=args.dataset_config)
        else:
            source = resolve_source(args.sources[0], detokenizer=args.detokenizer)
        documents, count = load_documents(source) if args.dataset else _text_documents(args.sources)
        streams = tokenize_documents(documents, spec_of(tokenizer), detokenizer=source.detokenizer,
                                     workers=args.workers, progress=args.progress, total=count)
        written = write_bin_shards(streams, args.out, args.shard_tokens)
    except (FileNotFoundError, ValueError, DatasetUnavailableError) as error:
        raise CliError(str(error)) from None
    total = sum(count for _, count in written)
    where = written[0][0] if len(written) == 1 else f"{len(written)} shards {written[0][0]} .. {written[-1][0].name}"
    print(f"wrote {total} tokens to {where} ({tokenizer.vocab_size - 1} ids, EOS {tokenizer.eos_id}; "
          f"--tokenizer {args.tokenizer})")
    return 0


def _text_documents(sources):
    from .data import read_documents

    documents = read_documents(sources)
    return documents, len(documents)


def _run_eval(args: argparse.Namespace) -> int:
    import numpy as np

    import hdlm_kernels as hk

    from .data import TokenDataset, bundled_corpus_path, load_tokens, split_train_val
    from .evaluate import perplexity_bound, token_batches, unigram_entropy
    from .generate import generate

    for name in ("batch_size", "mc_samples", "workers"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_batches is not None and args.num_batches < 1:
        raise CliError(f"--num-batches must be >= 1, got {args.num_batches}")
    if args.samples < 0:
        raise CliError(f"--samples must be >= 0, got {args.samples}")
    if args.dataset and args.data:
        raise CliError("give --dataset or --data, not both")
    if not args.dataset and not args.all_data and not 0.0 < args.val_fraction < 1.0:
        raise CliError(f"--val-fraction must lie in (0, 1), got {args.val_fraction} (use --all-data for the "
                       "whole data)")
    pretrained = _load_model(args)
    model, objective = pretrained.model, pretrained.objective
    if args.time == "discrete" and pretrained.family != "epsilon":
        raise CliError("--time discrete is defined for epsilon-family runs only (the γ DWDSE bound is "
                       "continuous-time)")
    seq_len = args.length or pretrained.length
    if seq_len > model.config.max_length:
        raise CliError(f"--length {seq_len} exceeds the model's max_length {model.config.max_length}")
    num_tokens = model.config.vocab_size - 1
    try:
        if args.dataset:
            split, data_name = _dataset_tokens(args, pretrained), args.dataset
            where = "all of"
        else:
            sources = args.data or [bundled_corpus_path()]
            tokens = load_tokens(sources, pretrained.tokenizer)
            split = tokens if args.all_data else split_train_val(tokens, args.val_fraction)[1]
            data_name = ", ".join(str(s) for s in sources)
            where = "all of" if args.all_data else f"last {args.val_fraction:g} of"
        if len(split) and int(np.max(split)) >= num_tokens:
            raise ValueError(f"the data holds token id {int(np.max(split))}, but the model knows ids "
                             f"[0, {num_tokens}) (MASK = {num_tokens}): it was tokenized with another tokenizer")
        dataset = TokenDataset(np.asarray(split), seq_len)
        batches = token_batches(dataset, args.batch_size, args.num_batches)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise CliError(str(error)) from None
    sched = _evaluation_schedule(pretrained, seq_len)
    o = objective
    options = dict(family=pretrained.family, gamma=pretrained.gamma, config=o.config,
                   context=o.attention_context, window=o.window, bos_id=o.bos_id, noise=pretrained.noise,
                   conditioning=pretrained.conditioning)
    result = perplexity_bound(model, batches, sched, num_samples=args.mc_samples, seed=args.seed,
                              progress=args.progress, time=args.time, **options)
    entropy = None
    if args.samples:
        use_cache = hk.masks.kv_cacheable(sched, o.config, o.attention_context)
        samples = generate(model, sched, args.samples, args.seed, kv_cache=use_cache, progress=args.progress,
                           **pretrained.sample_options())
        entropy = unigram_entropy(samples.tokens.cpu(), exclude=model.config.mask_id)

    print(pretrained.describe())
    print(f"{pretrained.family} family, {o.config}, context {o.attention_context}, {sched!r}")
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


def _evaluation_schedule(pretrained, length: int):
    try:
        return pretrained.schedule(length)
    except (TypeError, ValueError) as error:
        raise CliError(f"the model's schedule at --length {length}: {error}") from None


def _dataset_tokens(args: argparse.Namespace, pretrained):
    """The token stream of --dataset under the model's tokenizer (detokenized, EOS after each document)."""
    import numpy as np

    from .data import load_tokens
    from .text_datasets import DatasetUnavailableError, load_documents, resolve_source, tokenize_documents
    from .tokenizer_spec import spec_of

    if Path(args.dataset).suffix == ".bin":
        return load_tokens([args.dataset])
    try:
        source = resolve_source(args.dataset, split=args.split)
        documents, count = load_documents(source)
        streams = list(tokenize_documents(documents, spec_of(pretrained.tokenizer), detokenizer=source.detokenizer,
                                          workers=args.workers, progress=args.progress, total=count))
    except DatasetUnavailableError as error:
        raise CliError(str(error)) from None
    return np.concatenate(streams) if streams else np.zeros(0, dtype=np.uint16)


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
