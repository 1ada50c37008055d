"""Loading a trained model with everything needed to sample and score it: :func:`load_pretrained`,
:func:`load_run`.

Sources (docs/pretrained.md describes the formats):

* a Hugging Face hub id, e.g. ``hdlm-group/hdlm-base-gamma-0.01``: the snapshot is resolved with
  ``huggingface_hub`` (from the local cache only when ``HF_HUB_OFFLINE`` is set, or when the hub is
  unreachable) and read as the directory below;
* a directory in the hub layout of the official code: ``config.json`` or ``config.yaml`` (the whole run
  config), ``model.safetensors`` or ``pytorch_model.bin``, and the tokenizer files (without them, GPT-2's
  from the local hub cache);
* an official training checkpoint ``.../checkpoints/checkpoint_N.pth`` (raw weights, diffusers EMA,
  optimizer, step) with its run directory's ``.hydra/config.yaml`` two folders up, or that run
  directory itself (its newest checkpoint);
* a run of ``hdlm train`` (its newest intact checkpoint, or the ``checkpoint`` given).

Official checkpoints are loaded strictly into :class:`~hdlm_reference.model.DiT` (the state_dict is the
official one), and sampled with the official conditioning and σ̄ schedule (``conditioning="official"``,
log-linear ``eps = 5e-3``), which the loaded model records as ``model.conditioning`` and ``model.noise``
so that :func:`hdlm_reference.generate` and :mod:`hdlm_reference.evaluate` use them by default.

Errors are library errors: :class:`PretrainedError` (a ``ValueError``) and its subclass
:class:`ModelNotAvailableError` for a hub id that is neither cached nor reachable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import hdlm_kernels as hk

from . import official_config
from .checkpoint import CheckpointReadError, load_checkpoint, load_newest_intact_checkpoint
from .model import DiT, ModelConfig
from .noise import OFFICIAL_LOGLINEAR_EPS, LogLinearNoise
from .objective import ObjectiveConfig
from .tokenizer_spec import TokenizerUnavailableError, load_saved_tokenizer, load_tokenizer

__all__ = ["Pretrained", "PretrainedError", "ModelNotAvailableError", "load_pretrained", "load_run",
           "MODEL_CONFIG_FILE", "OBJECTIVE_FILE", "TRAIN_CONFIG_FILE", "HUB_FILES"]

MODEL_CONFIG_FILE = "model_config.json"
OBJECTIVE_FILE = "objective.json"
TRAIN_CONFIG_FILE = "config.json"
CONFIG_FILES = ("config.json", "config.yaml")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
HUB_FILES = (*CONFIG_FILES, *TOKENIZER_FILES, "generation_config.json")


class PretrainedError(ValueError):
    """A model cannot be loaded from what was given (the message names the file or id)."""


class ModelNotAvailableError(PretrainedError):
    """A hub id that is neither in the local cache nor reachable."""


@dataclass
class Pretrained:
    """A loaded model and what sampling and scoring it needs.

    Attributes:
        model: the :class:`DiT`, in eval mode, on the requested device and dtype.
        family: ``"epsilon"`` or ``"gamma"``; value: its ε or γ (:attr:`gamma`, :attr:`epsilon`).
        noise: the σ̄ schedule it was trained with. conditioning: ``"paper"`` or ``"official"``.
        tokenizer: the tokenizer of its data. objective: the hyperschedule layout it was trained with
            (:meth:`schedule` builds the schedule, :meth:`sample_options` the generate options).
        source: what was loaded (a path or hub id); kind: ``"hub"``, ``"directory"``,
            ``"official-checkpoint"`` or ``"run"``; step: the training step when known; weights:
            ``"ema"`` or ``"raw"`` (a hub snapshot holds one set, reported as ``"published"``).
        config: the run config (the official one, or ``hdlm train``'s config.json).
    """

    model: DiT
    family: str
    value: float
    noise: object
    tokenizer: object
    conditioning: str
    objective: ObjectiveConfig
    source: str
    kind: str
    step: int | None
    weights: str
    config: dict

    @property
    def gamma(self) -> float | None:
        return self.value if self.family == "gamma" else None

    @property
    def epsilon(self) -> float | None:
        return self.value if self.family == "epsilon" else None

    @property
    def length(self) -> int:
        """The sequence length the model was trained on."""
        if self.kind == "run":
            return int(self.config["seq_len"])
        return int(self.model.config.max_length)

    def schedule(self, length: int | None = None) -> hk.schedules.Hyperschedule:
        """The training hyperschedule at ``length`` (default :attr:`length`); τ_Flat (a window as wide as
        the training length) stays flat at a shorter ``length``. Raises ValueError when ``length`` is
        shorter than a narrower window."""
        length = self.length if length is None else length
        objective = self.objective
        if objective.width >= self.length and objective.width > length:  # τ_Flat: the whole sequence
            objective = ObjectiveConfig(**{**objective.to_dict(), "width": length})
        return objective.schedule_for(length)

    def sample_options(self) -> dict:
        """Keyword arguments of :func:`hdlm_reference.generate` for this model's layout and conditioning
        (method: ACS for ε, the analytic step for γ)."""
        o = self.objective
        return dict(method="acs" if self.family == "epsilon" else "analytic", config=o.config,
                    context=o.attention_context, window=o.window, bos_id=o.bos_id, noise=self.noise,
                    conditioning=self.conditioning)

    def describe(self) -> str:
        value = f"γ={self.value:g}" if self.family == "gamma" else f"ε={self.value:g}"
        step = f", checkpoint step {self.step}" if self.step is not None else ""
        return (f"{self.source} ({self.kind}{step}, {self.weights} weights): {self.family} family {value}, "
                f"{self.conditioning} conditioning, {self.objective.config}, {self.objective.schedule} ω="
                f"{self.objective.width}")


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------

def load_pretrained(name_or_path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None,
                    revision: str | None = None, ema: bool = True, cache_dir: str | os.PathLike | None = None,
                    checkpoint: str | os.PathLike | None = None) -> Pretrained:
    """Load a model from a hub id, a hub-layout directory, an official training checkpoint or run
    directory, or a run of ``hdlm train`` (module docstring).

    Args:
        device, dtype: where and in which floating dtype to put the model (default CPU, the stored dtype).
        revision: hub revision (branch, tag or commit) of a hub id.
        ema: use the EMA weights of a training checkpoint (official or ours); False: the raw weights.
            A hub snapshot has a single set of weights.
        cache_dir: the Hugging Face cache to read (default: huggingface_hub's).
        checkpoint: for a run directory, this checkpoint file instead of the newest.

    Raises:
        PretrainedError: nothing loadable at ``name_or_path`` (the message says why);
        ModelNotAvailableError: a hub id neither cached nor reachable.
    """
    target = Path(name_or_path)
    if target.exists():
        if target.is_file():
            if target.suffix == ".pth":
                return _load_official_checkpoint(target, device, dtype, ema)
            if target.parent.name == "checkpoints" and (target.parent.parent / MODEL_CONFIG_FILE).is_file():
                return load_run(target.parent.parent, ema=ema, checkpoint=target, device=device, dtype=dtype)
            raise PretrainedError(f"{target} is a file but neither an official training checkpoint (.pth) nor "
                                  "a checkpoint of an `hdlm train` run")
        if (target / MODEL_CONFIG_FILE).is_file():
            return load_run(target, ema=ema, checkpoint=checkpoint, device=device, dtype=dtype)
        if any((target / name).is_file() for name in CONFIG_FILES):
            return _load_hub_layout(target, str(target), "directory", device, dtype)
        if (target / ".hydra" / "config.yaml").is_file():
            return _load_official_checkpoint(_newest_official_checkpoint(target), device, dtype, ema)
        raise PretrainedError(f"{target} holds no model: expected a hub-layout directory (config.json or "
                              f"config.yaml + weights), an official run (.hydra/config.yaml + checkpoints/) or "
                              f"an `hdlm train` run ({MODEL_CONFIG_FILE})")
    snapshot = _hub_snapshot(str(name_or_path), revision, cache_dir)
    return _load_hub_layout(snapshot, str(name_or_path), "hub", device, dtype)


def load_run(run_dir: str | os.PathLike, *, ema: bool = True, checkpoint: str | os.PathLike | None = None,
             device=None, dtype: torch.dtype | None = None) -> Pretrained:
    """A run of ``hdlm train``: its newest intact checkpoint (a newer unreadable one is skipped with a
    warning naming it), or ``checkpoint``; EMA weights unless ``ema=False``; its recorded tokenizer."""
    run = Path(run_dir)
    for name in (MODEL_CONFIG_FILE, OBJECTIVE_FILE, TRAIN_CONFIG_FILE):
        if not (run / name).is_file():
            raise PretrainedError(f"{run} is not a run of `hdlm train` (no {name})")
    try:
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.is_file() and not path.is_absolute() and (run / "checkpoints" / path).is_file():
                path = run / "checkpoints" / path
            state = load_checkpoint(path)
        else:
            found = load_newest_intact_checkpoint(run / "checkpoints")
            if found is None:
                raise PretrainedError(f"{run} has no checkpoint yet (looked in {run / 'checkpoints'})")
            path, state = found
    except (FileNotFoundError, CheckpointReadError) as error:
        raise PretrainedError(str(error)) from None
    try:
        model_config = ModelConfig(**json.loads((run / MODEL_CONFIG_FILE).read_text()))
        objective = ObjectiveConfig(**json.loads((run / OBJECTIVE_FILE).read_text()))
    except (TypeError, ValueError) as error:
        raise PretrainedError(f"{run}: {MODEL_CONFIG_FILE} or {OBJECTIVE_FILE} is invalid: {error}") from None
    model = DiT(model_config)
    _load_state(model, state["model"], path)
    if ema:
        _load_state(model, {**model.state_dict(), **state["ema"]["shadow"]}, path)
    try:
        tokenizer = load_saved_tokenizer(run, model_config.vocab_size - 1)
    except TokenizerUnavailableError as error:
        raise PretrainedError(str(error)) from None
    value = objective.gamma if objective.family == "gamma" else objective.epsilon
    pretrained = Pretrained(model=model, family=objective.family, value=value, noise=LogLinearNoise(),
                            tokenizer=tokenizer, conditioning="paper", objective=objective, source=str(run),
                            kind="run", step=int(state["step"]), weights="ema" if ema else "raw",
                            config=json.loads((run / TRAIN_CONFIG_FILE).read_text()))
    return _finish(pretrained, device, dtype)


# ---------------------------------------------------------------------------------------------
# official formats
# ---------------------------------------------------------------------------------------------

def _hub_snapshot(repo_id: str, revision: str | None, cache_dir) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise PretrainedError(f"{repo_id!r} is not a local path, and loading it from the Hugging Face hub needs "
                              "the optional package huggingface_hub (pip install hdlm-kernels[pretrained])") from error
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    kwargs = dict(revision=revision, cache_dir=cache_dir, local_files_only=offline)
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=[*HUB_FILES, "model.safetensors"], **kwargs))
        if not (snapshot / "model.safetensors").is_file():
            snapshot = Path(snapshot_download(repo_id, allow_patterns=[*HUB_FILES, "pytorch_model.bin"], **kwargs))
    except Exception as error:  # invalid id, not cached, unreachable, unknown revision
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else \
            "in the local Hugging Face cache, and the hub could not be reached or does not have it"
        raise ModelNotAvailableError(
            f"{repo_id!r} is not a local path, and the model is not {where} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error
    return snapshot


def _load_hub_layout(directory: Path, source: str, kind: str, device, dtype) -> Pretrained:
    config_path = next((directory / n for n in CONFIG_FILES if (directory / n).is_file()), None)
    if config_path is None:
        raise PretrainedError(f"{source}: no config.json or config.yaml in {directory}")
    weights_path = next((directory / n for n in WEIGHT_FILES if (directory / n).is_file()), None)
    if weights_path is None:
        raise PretrainedError(f"{source}: no model.safetensors or pytorch_model.bin in {directory}")
    cfg = _official_config(config_path)
    if weights_path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise PretrainedError(f"{weights_path} needs the optional package safetensors "
                                  "(pip install hdlm-kernels[pretrained])") from error
        try:
            state = load_file(str(weights_path))
        except Exception as error:
            raise PretrainedError(f"{weights_path} cannot be read: {error}") from error
    else:
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise PretrainedError(f"{weights_path} cannot be read (truncated or corrupt): {error}") from error
    model = _official_model(cfg, state, weights_path)
    tokenizer = _official_tokenizer(directory, cfg, source)
    return _finish(_official_pretrained(model, cfg, tokenizer, source, kind, None, "published"), device, dtype)


def _newest_official_checkpoint(run_dir: Path) -> Path:
    found = sorted(((int(p.stem.split("_")[-1]), p) for p in (run_dir / "checkpoints").glob("checkpoint_*.pth")
                    if p.stem.split("_")[-1].isdigit()), key=lambda item: item[0])
    if not found:
        raise PretrainedError(f"{run_dir} is an official run directory without checkpoints/checkpoint_N.pth")
    return found[-1][1]


def _load_official_checkpoint(path: Path, device, dtype, ema: bool) -> Pretrained:
    config_path = path.parent.parent / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise PretrainedError(f"{path}: the official run config {config_path} (two folders up) is missing")
    cfg = _official_config(config_path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PretrainedError(f"official checkpoint {str(path)!r} cannot be read (truncated or corrupt): "
                              f"{type(error).__name__}: {error}") from error
    if not isinstance(state, dict) or "model" not in state:
        raise PretrainedError(f"{path} is not an official training checkpoint (no 'model' entry)")
    model = _official_model(cfg, state["model"], path)
    if ema:
        _load_official_ema(model, state, path)
    tokenizer = _official_tokenizer(path.parent.parent, cfg, str(path))
    step = int(state["step"]) if "step" in state else None
    pretrained = _official_pretrained(model, cfg, tokenizer, str(path), "official-checkpoint", step,
                                      "ema" if ema else "raw")
    return _finish(pretrained, device, dtype)


def _load_official_ema(model: DiT, state: dict, path: Path) -> None:
    """diffusers' EMAModel keeps ``shadow_params``, one tensor per parameter in ``parameters()`` order,
    which is the order of the official module tree and of :class:`DiT`."""
    shadow = state.get("ema", {}).get("shadow_params") if isinstance(state.get("ema"), dict) else None
    if shadow is None:
        raise PretrainedError(f"{path} has no EMA weights (ema.shadow_params); pass ema=False for the raw ones")
    named = list(model.named_parameters())
    if len(shadow) != len(named):
        raise PretrainedError(f"{path}: ema.shadow_params holds {len(shadow)} tensors, the model has "
                              f"{len(named)} parameters")
    with torch.no_grad():
        for (name, parameter), value in zip(named, shadow):
            if tuple(value.shape) != tuple(parameter.shape):
                raise PretrainedError(f"{path}: EMA tensor for {name} has shape {tuple(value.shape)}, "
                                      f"expected {tuple(parameter.shape)}")
            parameter.copy_(value)


def _official_config(path: Path) -> dict:
    try:
        return official_config.read_config_file(path)
    except official_config.OfficialConfigError as error:
        raise PretrainedError(str(error)) from None


def _official_model(cfg: dict, state: dict, path: Path) -> DiT:
    try:
        model_config = official_config.model_config(cfg)
    except official_config.OfficialConfigError as error:
        raise PretrainedError(f"{path}: {error}") from None
    model = DiT(model_config)
    _load_state(model, _strip_prefixes(state), path)
    return model


def _strip_prefixes(state: dict) -> dict:
    # wrappers of the official training (DDP, torch.compile) prefix every key
    for prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def _load_state(model: DiT, state: dict, path) -> None:
    """Strict loading, with a message naming the file and the mismatching entries."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})" for k in expected
             if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise PretrainedError(f"{path} does not match the model {model.config.family} "
                              f"(hidden {model.config.hidden_size}, {model.config.num_layers} layers, vocabulary "
                              f"{model.config.vocab_size}): missing {missing[:4]}, unexpected {unexpected[:4]}, "
                              f"shapes {wrong[:4]}")
    model.load_state_dict(state, strict=True)


def _official_tokenizer(directory: Path, cfg: dict, source: str):
    num_tokens = int(cfg.get("tokenizer", {}).get("tokens", official_config.GPT2_TOKENS))
    try:
        if any((directory / name).is_file() for name in ("tokenizer.json", "vocab.json")):
            tokenizer = load_tokenizer(str(directory))
        elif num_tokens == official_config.GPT2_TOKENS:
            tokenizer = load_tokenizer("gpt2")  # GPT-2's files from the local hub cache
        else:
            raise TokenizerUnavailableError(f"no tokenizer files in {directory}")
    except TokenizerUnavailableError as error:
        raise PretrainedError(f"{source}: no usable tokenizer ({error})") from None
    if tokenizer.vocab_size - 1 != num_tokens:
        raise PretrainedError(f"{source}: the tokenizer has {tokenizer.vocab_size - 1} tokens, but the model "
                              f"was trained on tokenizer.tokens = {num_tokens}")
    return tokenizer


def _official_pretrained(model: DiT, cfg: dict, tokenizer, source: str, kind: str, step, weights: str) -> Pretrained:
    try:
        objective = official_config.objective_config(cfg)
    except official_config.OfficialConfigError as error:
        raise PretrainedError(f"{source}: {error}") from None
    return Pretrained(model=model, family=objective.family, value=official_config.process_value(cfg),
                      noise=LogLinearNoise(OFFICIAL_LOGLINEAR_EPS), tokenizer=tokenizer, conditioning="official",
                      objective=objective, source=source, kind=kind, step=step, weights=weights, config=cfg)


def _finish(pretrained: Pretrained, device, dtype) -> Pretrained:
    model = pretrained.model
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise PretrainedError(f"device {str(device)!r} requested but CUDA is not available here "
                                  f"(torch {torch.__version__})")
    if dtype is not None and not dtype.is_floating_point:
        raise PretrainedError(f"dtype must be a floating dtype, got {dtype}")
    inv_freq = model.rotary_emb.inv_freq.detach().clone()
    model = model.to(device=device, dtype=dtype)
    # rotary frequencies stay float32 whatever the dtype: bf16 would round them (the angles are
    # computed in at least float32 anyway)
    model.rotary_emb.inv_freq = inv_freq.to(model.rotary_emb.inv_freq.device)
    model.eval()
    model.conditioning = pretrained.conditioning
    model.noise = pretrained.noise
    pretrained.model = model
    return pretrained

