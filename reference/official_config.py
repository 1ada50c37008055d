"""The official run configuration (hydra / OmegaConf dict) mapped onto this package's configurations.

An official checkpoint comes with the whole run config: ``config.json`` or ``config.yaml`` in a hub
snapshot, ``.hydra/config.yaml`` in a training run directory (docs/pretrained.md lists the fields).
:func:`read_config_file` reads either (YAML interpolations ``${a.b}`` resolved), :func:`model_config`
builds the :class:`~hdlm_reference.model.ModelConfig` whose state_dict is the official one, and
:func:`objective_config` the hyperschedule layout the model was trained and is sampled with.

Options that change what the official network computes without changing its parameters
(``scale_by_sigma``, ``hybrid_sigma_embedding`` for γ) must have the shipped values; anything else is
refused with a :class:`OfficialConfigError` naming the field rather than loaded into a model that would
compute something else.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .model import ModelConfig
from .objective import ObjectiveConfig

__all__ = ["OfficialConfigError", "read_config_file", "family", "process_value", "model_config",
           "objective_config", "GPT2_TOKENS"]

GPT2_TOKENS = 50257
_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")


class OfficialConfigError(ValueError):
    """An official run config that cannot be mapped (missing or unsupported field)."""


def read_config_file(path: str | Path) -> dict:
    """The run config in ``path`` (``.json`` or ``.yaml``/``.yml``) as a plain dict, with whole-value
    interpolations ``${a.b}`` resolved against it; a ``{"config": {...}}`` wrapper is unwrapped."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # a dependency of huggingface_hub

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as error:
        raise OfficialConfigError(f"cannot parse the run config {str(path)!r}: {error}") from error
    if isinstance(data, dict) and set(data) == {"config"} and isinstance(data["config"], dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise OfficialConfigError(f"the run config {str(path)!r} is not a mapping")
    return _resolve(data, data, 0)


def _lookup(root: dict, dotted: str):
    node = root
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _resolve(node, root: dict, depth: int):
    if depth > 20:
        raise OfficialConfigError("the run config's interpolations do not terminate")
    if isinstance(node, dict):
        return {k: _resolve(v, root, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root, depth) for v in node]
    if isinstance(node, str):
        match = _INTERPOLATION.match(node)
        if match:
            target = _lookup(root, match.group(1))
            if target is not None:
                return _resolve(target, root, depth + 1)
    return node


def _get(cfg: dict, dotted: str, default=None, required: bool = False):
    value = _lookup(cfg, dotted)
    if value is None:
        if required:
            raise OfficialConfigError(f"the official run config has no {dotted!r}")
        return default
    return value


def family(cfg: dict) -> str:
    """``"epsilon"`` or ``"gamma"``: from ``model_type`` (``epsilon_hybrid`` / ``gamma_hybrid``), else
    the prefix of ``model.name``."""
    model_type = cfg.get("model_type")
    if model_type in ("epsilon_hybrid", "gamma_hybrid"):
        return model_type.split("_")[0]
    name = str(_get(cfg, "model.name", ""))
    if name.startswith(("epsilon", "gamma")):
        return name.split("_")[0]
    raise OfficialConfigError(f"cannot tell the family of the official run config: model_type is {model_type!r} "
                              f"and model.name {name!r} (expected epsilon_hybrid or gamma_hybrid)")


def process_value(cfg: dict) -> float:
    """γ (``graph.gamma``; 0 for an absorbing graph) or ε (``training.epsilon``) of the run."""
    if family(cfg) == "epsilon":
        return float(_get(cfg, "training.epsilon", 0.01))
    graph = str(_get(cfg, "graph.type", "QGamma"))
    if graph in ("absorb", "absorbing"):
        return 0.0
    if graph not in ("QGamma", "hybrid"):
        raise OfficialConfigError(f"graph.type {graph!r} is not supported (expected QGamma or absorb)")
    return float(_get(cfg, "graph.gamma", required=True))


def model_config(cfg: dict) -> ModelConfig:
    """The :class:`ModelConfig` of an official run: vocabulary ``tokenizer.tokens + 1`` (MASK last),
    ``model.{hidden_size, n_blocks, n_heads, cond_dim, length, dropout}``, the family and γ."""
    fam = family(cfg)
    gamma = process_value(cfg) if fam == "gamma" else 0.01

    def flag(name: str) -> bool:
        return bool(_get(cfg, f"model.{name}", fam == "gamma"))

    if fam == "gamma":
        needed = ["scale_by_sigma", "transformer_sigma_conditioning", "use_timestep_embedding"]
        # without the weighted embedding the official γ model embeds tokens as they are, which is
        # Eq. 12 only at γ = 0 (an absorbing graph)
        if gamma != 0.0:
            needed.append("hybrid_sigma_embedding")
        for name in needed:
            if not flag(name):
                raise OfficialConfigError(f"model.{name} is False in this γ run config; only the shipped γ "
                                          "configuration (True) is supported")
    else:
        for name in ("transformer_sigma_conditioning", "use_timestep_embedding"):
            if flag(name):
                raise OfficialConfigError(f"model.{name} is True in this ε run config; the ε model has no σ "
                                          "conditioning")
    try:
        return ModelConfig(
            vocab_size=int(_get(cfg, "tokenizer.tokens", GPT2_TOKENS)) + 1,
            hidden_size=int(_get(cfg, "model.hidden_size", required=True)),
            num_layers=int(_get(cfg, "model.n_blocks", required=True)),
            num_heads=int(_get(cfg, "model.n_heads", required=True)),
            cond_dim=int(_get(cfg, "model.cond_dim", 128)),
            max_length=int(_get(cfg, "model.length", 1024)),
            family=fam, gamma=gamma, dropout=float(_get(cfg, "model.dropout", 0.1)))
    except ValueError as error:
        raise OfficialConfigError(f"the official run config gives an invalid model: {error}") from error


def objective_config(cfg: dict) -> ObjectiveConfig:
    """The hyperschedule layout of an official run: ``annealing.type`` block -> τ_Block, simple ->
    τ_Slide (hybrid -> τ_Block, which the official code samples hybrid-trained models with; none ->
    τ_Flat), ``annealing.width`` and ``eval_tau`` (else ``tau``) levels, ``annealing.attention``
    context / window, SHIFTED when ``type`` is shifted or ``annealing.sampling_method`` is AR (BOS =
    the last token, GPT-2's ``<|endoftext|>``)."""
    fam = family(cfg)
    length = int(_get(cfg, "model.length", 1024))
    kind = str(_get(cfg, "annealing.type", "none")).lower()
    width = int(_get(cfg, "annealing.width", length))
    levels = _get(cfg, "annealing.eval_tau", None) or _get(cfg, "annealing.tau", None)
    if kind in ("block", "hybrid"):
        schedule = "block"
    elif kind == "simple":
        schedule = "slide"
    elif kind in ("none", "null"):
        schedule, width = "block", length
    else:
        raise OfficialConfigError(f"annealing.type {kind!r} is not supported (block, simple, hybrid or none)")
    shifted = (str(cfg.get("type", "aligned")).lower() == "shifted"
               or str(_get(cfg, "annealing.sampling_method", "SAR")).upper() in ("AR", "AR_BAD", "AR_SCRATCH"))
    tokens = int(_get(cfg, "tokenizer.tokens", GPT2_TOKENS))
    value = process_value(cfg)
    return ObjectiveConfig(
        family=fam, schedule=schedule, width=min(width, length),
        levels=int(levels) if levels is not None else None, config="shifted" if shifted else "aligned",
        context=str(_get(cfg, "annealing.attention.context_type", "block_causal")),
        window=str(_get(cfg, "annealing.attention.block_type", "full")),
        gamma=value if fam == "gamma" else 0.01, epsilon=value if fam == "epsilon" else 0.01,
        lam=float(_get(cfg, "training.lambda", 1.0)), bos_id=tokens - 1 if shifted else None)
