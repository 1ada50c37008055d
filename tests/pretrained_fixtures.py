"""Tiny models in the official formats, built in temporary directories at test time (nothing downloads):
a byte-level BPE tokenizer trained with `tokenizers` on the bundled corpus, a hub-layout directory
(config.json with the official run-config fields, model.safetensors, tokenizer.json) and an official
training run (.hydra/config.yaml with OmegaConf interpolations, checkpoints/checkpoint_N.pth holding raw
weights, a diffusers-style EMA and an optimizer state)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hdlm_reference.data import bundled_corpus_path
from hdlm_reference.model import DiT, ModelConfig

TOKENIZER_VOCAB = 320
LENGTH = 32


def train_tokenizer(directory: Path, vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """A GPT-2-style byte-level BPE trained on the bundled corpus: tokenizer.json, vocab.json, merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(p) for p in sorted(bundled_corpus_path().glob("*.txt"))], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer.model.save(str(directory))  # vocab.json + merges.txt
    return directory


def official_config(family: str, tokens: int = TOKENIZER_VOCAB, *, gamma: float = 0.05, epsilon: float = 0.02,
                    width: int = 8, tau: int = 4, kind: str = "block") -> dict:
    """A run config with the official field names and a tiny model (hidden 32, 2 blocks, 2 heads)."""
    gamma_family = family == "gamma"
    return {
        "model_type": f"{family}_hybrid",
        "type": "aligned",
        "ngpus": 1,
        "tokenizer": {"tokens": tokens, "model": "gpt2"},
        "training": {"batch_size": 4, "ema": 0.9999, "epsilon": epsilon, "lambda": 1.0, "loss_type": "hybrid"},
        "graph": {"type": "QGamma", "gamma": gamma, "expanded_sigma": True},
        "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 10.0},
        "model": {"name": f"{family}_hdlm", "type": "ddit", "hidden_size": 32, "cond_dim": 16, "length": LENGTH,
                  "n_blocks": 2, "n_heads": 2, "dropout": 0.1, "scale_by_sigma": gamma_family,
                  "transformer_sigma_conditioning": gamma_family, "hybrid_sigma_embedding": gamma_family,
                  "post_process_logits": gamma_family, "use_timestep_embedding": gamma_family},
        "annealing": {"type": kind, "efficient": False, "width": width, "tau": tau, "eval_tau": tau,
                      "sampling_method": "SAR", "sampling_eps": 1e-4,
                      "attention": {"context_type": "block_causal", "block_type": "full"}},
    }


def random_model(family: str, tokens: int = TOKENIZER_VOCAB, gamma: float = 0.05, seed: int = 0) -> DiT:
    """A DiT of the official config's sizes with every parameter random (zero-initialized heads and
    adaLN would hide mistakes)."""
    config = ModelConfig(vocab_size=tokens + 1, hidden_size=32, num_layers=2, num_heads=2, cond_dim=16,
                         max_length=LENGTH, family=family, gamma=gamma if family == "gamma" else 0.01, dropout=0.1)
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 0.3)
    return model.eval()


def write_hub_layout(directory: Path, family: str, tokenizer_dir: Path, *, seed: int = 0,
                     weights: str = "safetensors", config_format: str = "json", **config) -> DiT:
    """A directory as the official upload helper writes it; returns the model whose weights it holds."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    cfg = official_config(family, **config)
    model = random_model(family, cfg["tokenizer"]["tokens"], cfg["graph"]["gamma"], seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        save_file(state, str(directory / "model.safetensors"))
    else:
        torch.save(state, directory / "pytorch_model.bin")
    if config_format == "json":
        (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    else:
        (directory / "config.yaml").write_text(_yaml_with_interpolation(cfg))
    (directory / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    return model


def _yaml_with_interpolation(cfg: dict) -> str:
    import yaml

    cfg = json.loads(json.dumps(cfg))
    cfg["annealing"]["eval_tau"] = "${annealing.tau}"  # as the shipped configs write it
    return yaml.safe_dump(cfg, sort_keys=False)


def write_official_run(run_dir: Path, family: str, tokenizer_dir: Path | None, *, step: int = 7,
                       seed: int = 0, **config) -> tuple[Path, DiT, DiT]:
    """An official training run directory: ``.hydra/config.yaml`` and
    ``checkpoints/checkpoint_{step}.pth`` = {optimizer, model (raw), ema (diffusers EMAModel state:
    shadow_params in parameter order), step}. Returns (checkpoint path, raw model, EMA model)."""
    cfg = official_config(family, **config)
    raw = random_model(family, cfg["tokenizer"]["tokens"], cfg["graph"]["gamma"], seed)
    ema = random_model(family, cfg["tokenizer"]["tokens"], cfg["graph"]["gamma"], seed + 1)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra" / "config.yaml").write_text(_yaml_with_interpolation(cfg))
    if tokenizer_dir is not None:
        for name in ("vocab.json", "merges.txt"):
            (run_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    # an AdamW state_dict's layout (building a real optimizer costs seconds of imports)
    parameters = list(raw.parameters())
    optimizer = {"state": {i: {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(p),
                               "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(parameters)},
                 "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                   "params": list(range(len(parameters)))}]}
    state = {"optimizer": optimizer, "model": raw.state_dict(),
             "ema": {"decay": 0.9999, "min_decay": 0.0, "optimization_step": step, "update_after_step": 2000,
                     "use_ema_warmup": False, "inv_gamma": 1.0, "power": 0.6667,
                     "shadow_params": [p.detach().clone() for p in ema.parameters()]},
             "step": step}
    path = run_dir / "checkpoints" / f"checkpoint_{step}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path, raw, ema


def write_hub_cache(cache: Path, repo_id: str, snapshot_source: Path, commit: str = "a" * 40) -> Path:
    """``snapshot_source``'s files laid out as the Hugging Face cache holds a downloaded snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in snapshot_source.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
