"""The HDLM denoiser: a DiT with rotary positions, as in the official code (docs/official-code.md §4), with the
parameter names and shapes of the official state_dict (notes App. C) so published checkpoints load.

Families (docs/architecture.md, the reference harness):
    ``"epsilon"`` (ε-hybrid, MDLM framework): no time conditioning; blocks add their branches with gate 1.
    ``"gamma"`` (γ-hybrid, SEDD framework): per-token conditioning on the total noise σ̄ — the weighted
        token embedding of paper Eq. 12, ``e^{-γσ̄}·E[x] + (1 - e^{-γσ̄})·E[MASK]``, and adaLN-Zero
        modulation ``(shift, scale, gate) × 2`` of every block from ``c = SiLU(MLP(sinusoid_256(σ̄)))``.
        The final layer has no adaLN (like the official ``DDitFinalLayer``).

The model returns raw logits; the γ score parametrization (``scale_by_sigma``, post-processing) lives
with the losses and samplers.

Departures from the official code, on purpose:
    * rotary angles come from each token's own ``position_ids`` (the official cache is keyed by the
      sequence length and built from ``positions[0]``, docs/official-differences.md, model);
    * attention goes through :func:`hdlm_kernels.attention.attention`, where a row without keys outputs
      zeros (the official code attends uniformly to all keys there, docs/official-differences.md, model), and it has no
      dropout on the attention probabilities (the official applies dropout there too; the attention
      backends take no dropout argument); dropout is applied to both residual branches;
    * no autocast inside the model: the caller chooses it (the official forces bf16 autocast). LayerNorm
      runs in float32 (float64 for a float64 model) as in the official ``LayerNorm``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import hdlm_kernels as hk
from hdlm_kernels.masks import IntervalMask

__all__ = ["ModelConfig", "DiT", "FAMILIES", "PRESETS"]

FAMILIES = ("epsilon", "gamma")
PRESETS = ("tiny", "small")

_SIGMA_FREQUENCY_DIM = 256  # width of the sinusoidal σ̄ features (official TimestepEmbedder default)
_SIGMA_MAX_PERIOD = 10_000.0
_LAYER_NORM_EPS = 1e-5


@dataclass
class ModelConfig:
    """Sizes and options of a :class:`DiT`.

    Attributes:
        vocab_size: number of token ids including MASK, which is the last id (``vocab_size - 1``).
        hidden_size, num_layers, num_heads: transformer sizes; ``hidden_size / num_heads`` must be even.
        mlp_ratio: MLP width over ``hidden_size``.
        cond_dim: width of the σ̄ conditioning vector (γ family).
        max_length: the sequence length ``d`` the model is trained on (default KV-cache size).
        family: ``"epsilon"`` or ``"gamma"`` (see the module docstring).
        gamma: the γ of the hybrid process, used by the weighted token embedding (γ family only).
        dropout: dropout probability on both residual branches in training mode.
        attention_backend: the ``hdlm_kernels.attention.attention`` backend of the calls without a KV
            cache (training, uncached inference): a name of ``hk.backends.names("attention")``.
        decode_backend: the ``hdlm_kernels.attention.decode`` backend of KV-cached calls, a name of
            ``hk.backends.names("decode")`` (which has ``"cuda"`` besides the attention backends);
            None: ``attention_backend``.
        rotary_base: rotary frequency base.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_ratio: int = 4
    cond_dim: int = 128
    max_length: int = 1024
    family: str = "epsilon"
    gamma: float = 0.01
    dropout: float = 0.1
    attention_backend: str = "reference"
    rotary_base: float = 10_000.0
    decode_backend: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_ratio", "cond_dim",
                     "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig: {name} must be an int >= 1, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"ModelConfig: vocab_size must be >= 2 (tokens plus MASK), got "
                             f"{self.vocab_size}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError("ModelConfig: hidden_size / num_heads must be an even integer (rotary pairs), "
                             f"got hidden_size={self.hidden_size}, num_heads={self.num_heads}")
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig: unknown family {self.family!r}; expected one of "
                             f"{', '.join(map(repr, FAMILIES))}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig: dropout must be in [0, 1), got {self.dropout}")
        if not self.gamma >= 0.0:
            raise ValueError(f"ModelConfig: gamma must be >= 0, got {self.gamma}")
        hk.backends.check_name("attention", self.attention_backend, "ModelConfig.attention_backend")
        if self.decode_backend is not None:
            hk.backends.check_name("decode", self.decode_backend, "ModelConfig.decode_backend")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1

    @classmethod
    def preset(cls, name: str, family: str = "epsilon", vocab_size: int | None = None,
               **overrides) -> "ModelConfig":
        """A named configuration; ``overrides`` replace any field.

        ``"tiny"``: 2 layers, hidden 64, 4 heads, cond 32, ``vocab_size`` 257 (256 byte values + MASK),
        length 128, no dropout: for tests and CPU runs.
        ``"small"``: the paper scale (docs/official-code.md §4): 12 layers, hidden 768, 12 heads, cond 128,
        ``vocab_size`` 50258 (GPT-2 + MASK), length 1024, dropout 0.1.
        """
        if name == "tiny":
            fields = dict(vocab_size=257, hidden_size=64, num_layers=2, num_heads=4, cond_dim=32,
                          max_length=128, dropout=0.0)
        elif name == "small":
            fields = dict(vocab_size=50258, hidden_size=768, num_layers=12, num_heads=12, cond_dim=128,
                          max_length=1024, dropout=0.1)
        else:
            raise ValueError(f"ModelConfig.preset: unknown name {name!r}; expected one of "
                             f"{', '.join(map(repr, PRESETS))}")
        if vocab_size is not None:
            fields["vocab_size"] = vocab_size
        fields["family"] = family
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"ModelConfig.preset: unknown fields {sorted(unknown)}")
        fields.update(overrides)
        return cls(**fields)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: the precision of normalizations, sinusoids and returned logits."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------------------------
# Layers (attribute names are the official state_dict's)
# ---------------------------------------------------------------------------------------------
class TokenEmbedding(nn.Module):
    """``embedding``: ``[vocab_size, hidden]``; optionally the weighted embedding of paper Eq. 12."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, hidden_size))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))  # the official initialization

    def forward(self, input_ids: torch.Tensor, sigma: torch.Tensor | None = None,
                gamma: float | None = None) -> torch.Tensor:
        """``[B, S]`` ids -> ``[B, S, hidden]``. With ``sigma`` (σ̄ ``[B, S]``) and ``gamma``:
        ``e^{-γσ̄}·E[x] + (1 - e^{-γσ̄})·E[MASK]`` (MASK = last id), Eq. 12."""
        embedded = F.embedding(input_ids, self.embedding)
        if sigma is None:
            return embedded
        dtype = torch.promote_types(self.embedding.dtype, sigma.dtype)
        keep = torch.exp(-gamma * sigma.to(dtype))[..., None]
        mixed = keep * embedded.to(dtype) + (1 - keep) * self.embedding[-1].to(dtype)
        return mixed.to(self.embedding.dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half (GPT-NeoX) rotary embedding; ``inv_freq`` ``[head_dim / 2]`` is a persistent buffer
    (it is in the official state_dict)."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin``: ``[B, S, 1, head_dim]`` in at least float32, from per-token positions ``[B, S]``."""
        # At least float32 even in a bfloat16 model: bf16 cannot even represent positions above 256.
        inv_freq = self.inv_freq.to(_compute_dtype(self.inv_freq.dtype))
        angles = position_ids.to(inv_freq.dtype)[..., None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x`` ``[B, S, H, D]``, in ``x``'s dtype."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm without bias (eps 1e-5), computed in at least float32, returned in the weight's dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x.dtype)
        normed = F.layer_norm(x.to(dtype), (x.shape[-1],), eps=_LAYER_NORM_EPS) * self.weight.to(dtype)
        return normed.to(self.weight.dtype)


class SigmaEmbedder(nn.Module):
    """σ̄ ``[B, S]`` -> ``MLP(sinusoid_256(σ̄))`` ``[B, S, cond_dim]`` (the official ``TimestepEmbedder``;
    the caller applies the SiLU). Sinusoid: ``[cos(σ̄ f_j), sin(σ̄ f_j)]``, ``f_j = 10⁴^{-j/128}``."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(_SIGMA_FREQUENCY_DIM, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        weight = self.mlp[0].weight
        dtype = _compute_dtype(weight.dtype)
        half = _SIGMA_FREQUENCY_DIM // 2
        freqs = torch.exp(-math.log(_SIGMA_MAX_PERIOD)
                          * torch.arange(half, dtype=dtype, device=sigma.device) / half)
        args = sigma.to(dtype)[..., None] * freqs
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(weight.dtype))


class DiTBlock(nn.Module):
    """Pre-norm transformer block: rotary attention over an ``IntervalMask``, GELU-tanh MLP, and for the
    γ family adaLN-Zero modulation from the per-token conditioning (docs/official-code.md §4)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.attention_backend = config.attention_backend
        self.decode_backend = config.decode_backend or config.attention_backend
        self.norm1 = LayerNorm(hidden)
        self.attn_qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, config.mlp_ratio * hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.mlp_ratio * hidden, hidden))
        self.dropout = nn.Dropout(config.dropout)
        if config.family == "gamma":
            self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * hidden)
            # adaLN-Zero: every block starts as the identity.
            nn.init.zeros_(self.adaLN_modulation.weight)
            nn.init.zeros_(self.adaLN_modulation.bias)
        else:
            self.adaLN_modulation = None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: IntervalMask,
                cond: torch.Tensor | None = None, kv_cache: hk.KVCache | None = None,
                layer: int = 0, check: bool = True) -> torch.Tensor:
        """``h`` ``[B, S, hidden]`` -> same. ``cond`` ``[B, S, cond_dim]`` (γ only). With ``kv_cache``,
        the rows' keys/values are written at cells ``[length, length + S)`` of ``layer`` and the rows
        attend over cells ``[0, mask.key_length)`` of the cache (``check``: see ``decode``)."""
        B, S, _ = h.shape
        modulated = self.adaLN_modulation is not None
        if modulated:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(cond).chunk(6, dim=-1)
        a = self.norm1(h)
        if modulated:
            a = a * (1 + scale1) + shift1
        q, k, v = self.attn_qkv(a).view(B, S, 3, self.num_heads, -1).unbind(2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            # One call writes the rows' keys/values at cells [length, length + S) and attends over the
            # cached prefix plus the rows (docs/architecture.md, generation data flow); the caller advances the length.
            o = hk.attention.decode(q, kv_cache.k[layer], kv_cache.v[layer], kv_cache.length, k, v, mask,
                                    backend=self.decode_backend, check=check)
        else:
            o = hk.attention.attention(q, k, v, mask, backend=self.attention_backend)
        o = self.dropout(self.attn_out(o.reshape(B, S, -1)))
        h = h + (gate1 * o if modulated else o)
        m = self.norm2(h)
        if modulated:
            m = m * (1 + scale2) + shift2
        m = self.dropout(self.mlp(m))
        return h + (gate2 * m if modulated else m)


class FinalLayer(nn.Module):
    """``linear(norm_final(h))``; the linear is zero-initialized (weight and bias), so a fresh model's
    logits are its bias (zero). No adaLN, like the official ``DDitFinalLayer``."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, vocab_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(h))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
def _check_index_tensor(name: str, value, B: int, S: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool:
        raise TypeError(f"DiT.forward: {name} must be an integer tensor, got "
                        f"{getattr(value, 'dtype', type(value).__name__)}")
    if value.dim() != 2 or value.shape[1] != S or value.shape[0] not in (1, B):
        raise ValueError(f"DiT.forward: {name} must have shape [B={B}, S={S}] (or [1, S]), got "
                         f"{tuple(value.shape)}")
    return value.expand(B, S)


def _select_rows(h: torch.Tensor, rows) -> torch.Tensor:
    """The rows of ``h`` ``[B, S, hidden]`` whose logits are wanted (see ``DiT.forward``)."""
    if rows is None:
        return h
    B, S, _ = h.shape
    if not isinstance(rows, torch.Tensor) or rows.dtype.is_floating_point:
        raise TypeError("DiT.forward: logits_rows must be None, a bool tensor [B, S] or an integer tensor "
                        f"[R] or [B, R], got {getattr(rows, 'dtype', type(rows).__name__)}")
    rows = rows.to(h.device)
    if rows.dtype == torch.bool:
        if rows.shape != (B, S):
            raise ValueError(f"DiT.forward: a bool logits_rows must have shape [B={B}, S={S}], got "
                             f"{tuple(rows.shape)}")
        return h[rows]
    if rows.dim() not in (1, 2) or (rows.dim() == 2 and rows.shape[0] != B):
        raise ValueError(f"DiT.forward: integer logits_rows must have shape [R] or [B={B}, R], got "
                         f"{tuple(rows.shape)}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= S):
        raise ValueError(f"DiT.forward: logits_rows must lie in [0, {S}), got values in "
                         f"[{int(rows.min())}, {int(rows.max())}]")
    if rows.dim() == 1:
        return h[:, rows]
    return h[torch.arange(B, device=h.device)[:, None], rows]


class DiT(nn.Module):
    """The HDLM denoiser (see the module docstring). Parameters, in state_dict order:
    ``vocab_embed.embedding``, ``rotary_emb.inv_freq`` (buffer), ``blocks.{i}.*``, ``output_layer.*``,
    and for the γ family ``sigma_map.mlp.{0,2}.*``, exactly as the official checkpoints.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"DiT: config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.vocab_embed = TokenEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rotary_base)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.num_layers))
        self.output_layer = FinalLayer(config.hidden_size, config.vocab_size)
        self.sigma_map = SigmaEmbedder(config.cond_dim) if config.family == "gamma" else None

    def use_attention_backend(self, backend: str, decode_backend: str | None = None) -> "DiT":
        """Route every block's uncached attention through ``backend`` (a name of
        ``hk.backends.names("attention")``) and its KV-cached calls through ``decode_backend`` (a name
        of ``hk.backends.names("decode")``; None: ``backend``), e.g. to compare the reference with a
        kernel on the same weights; returns the model."""
        hk.backends.check_name("attention", backend, "DiT.use_attention_backend")
        if decode_backend is not None:
            hk.backends.check_name("decode", decode_backend, "DiT.use_attention_backend")
        self.config.attention_backend = backend
        self.config.decode_backend = decode_backend
        for block in self.blocks:
            block.attention_backend = backend
            block.decode_backend = decode_backend or backend
        return self

    def new_kv_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                     device=None) -> hk.KVCache:
        """An empty cache for this model: ``max_len`` defaults to ``config.max_length`` (SHIFTED needs
        one more cell), ``dtype`` and ``device`` to the parameters' (pass the autocast dtype under
        autocast)."""
        weight = self.vocab_embed.embedding
        c = self.config
        return hk.KVCache(c.num_layers, batch, c.max_length if max_len is None else max_len, c.num_heads,
                          c.head_dim, weight.dtype if dtype is None else dtype,
                          weight.device if device is None else device)

    def _check_kv_cache(self, kv_cache, position_ids: torch.Tensor, B: int, n: int, check: bool = True) -> int | None:
        """Validate an incremental call; return its key length ``max(length) + n`` (None when ``check``
        is False: the values are not read)."""
        c = self.config
        if not isinstance(kv_cache, hk.KVCache):
            raise TypeError(f"DiT.forward: kv_cache must be an hdlm_kernels.KVCache, got "
                            f"{type(kv_cache).__name__}")
        expected = (c.num_layers, B, c.num_heads, c.head_dim)
        given = (kv_cache.num_layers, kv_cache.batch, kv_cache.heads, kv_cache.head_dim)
        if given != expected:
            raise ValueError(f"DiT.forward: kv_cache must have (num_layers, batch, heads, head_dim) = "
                             f"{expected}, got {given}")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise RuntimeError("DiT.forward: the KV-cached forward is inference-only (the cache stores "
                               "detached keys/values); call it under torch.no_grad() or "
                               "torch.inference_mode()")
        if not check:
            return None
        cells = kv_cache.length[:, None] + torch.arange(n, device=kv_cache.device)
        if not torch.equal(position_ids.to(device=cells.device, dtype=cells.dtype), cells):
            raise ValueError("DiT.forward: with a kv_cache, position_ids must be the cells the new rows are "
                             f"written to, kv_cache.length[:, None] + arange(n) = {cells.tolist()}, got "
                             f"{position_ids.tolist()}")
        return int(kv_cache.length.max()) + n

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: IntervalMask,
                sigma: torch.Tensor | None = None, logits_rows: torch.Tensor | None = None,
                kv_cache: hk.KVCache | None = None, *, logits_index: torch.Tensor | None = None,
                check: bool = True) -> torch.Tensor:
        """Logits of the rows in ``logits_rows``.

        Full / packed mode (``kv_cache`` None): the ``S`` cells attend each other through ``mask``.
        Incremental mode: the ``n = S`` new cells are cells ``[kv_cache.length, kv_cache.length + n)``
        of each sequence; every layer writes their keys/values there and attends over cache cells
        ``[0, max(kv_cache.length) + n)`` (final prefix + new rows). ``kv_cache.length`` is not advanced:
        the caller advances it by the number of cells that became final. Inference only (no grad).

        Args:
            input_ids: ``LongTensor [B, S]``, ids in ``[0, vocab_size)``.
            position_ids: integer ``[B, S]`` (or ``[1, S]``): each cell's position for the rotary
                embedding; with a cache they must equal the cells written (``length[:, None] + arange(n)``).
            mask: ``IntervalMask`` ``[1 or B, S]`` with ``key_length`` ``S`` (full mode) or
                ``max(kv_cache.length) + n`` (incremental mode; e.g. ``hk.masks.inference(...).rows(
                slice(length, None))``). In incremental mode with unequal lengths, sequence ``b``'s rows
                must not select cells ``>= length[b] + n``.
            sigma: σ̄ ``[B, S]`` (or ``[1, S]``), total noise of each cell's token; required by the γ
                family, ignored by ε.
            logits_rows: which rows get logits (the LM head is ~27% of the FLOPs at V = 50258): None =
                all -> ``[B, S, V]``; integer ``[R]`` (the same rows of every sequence) -> ``[B, R, V]``;
                integer ``[B, R]`` -> ``[B, R, V]``; bool ``[B, S]`` -> ``[N, V]`` (the True rows,
                row-major).
            kv_cache: an ``hk.KVCache`` from :meth:`new_kv_cache` (or equal sizes) for incremental mode.
            logits_index: instead of ``logits_rows``, int64 ``[N]`` indices of the wanted rows among
                the ``B·S`` rows in row-major order -> ``[N, V]`` (what a bool ``logits_rows`` selects,
                without the host synchronization of a boolean index).
            check: validate tensor values (token ids, the cache positions and lengths, index ranges).
                ``False`` skips every check that synchronizes with the device, for generation loops
                that validated their whole plan once (``hdlm_reference.generate``); shapes, dtypes and
                types are still checked. In incremental mode the key length is then ``mask.key_length``.

        Returns:
            raw logits in float32 (float64 for a float64 model).
        """
        c = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            given = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
            raise ValueError(f"DiT.forward: input_ids must be a tensor [B, S], got {given}")
        B, S = input_ids.shape
        _check_index_tensor("input_ids", input_ids, B, S)
        if check and input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= c.vocab_size):
            raise ValueError(f"DiT.forward: input_ids must lie in [0, vocab_size={c.vocab_size}), got values "
                             f"in [{int(input_ids.min())}, {int(input_ids.max())}]")
        position_ids = _check_index_tensor("position_ids", position_ids, B, S)
        if not isinstance(mask, IntervalMask):
            raise TypeError(f"DiT.forward: mask must be an hdlm_kernels.masks.IntervalMask, got "
                            f"{type(mask).__name__}")
        key_length = S
        if kv_cache is not None:
            key_length = self._check_kv_cache(kv_cache, position_ids, B, S, check)
            key_length = mask.key_length if key_length is None else key_length
        if logits_index is not None:
            if logits_rows is not None:
                raise ValueError("DiT.forward: pass logits_rows or logits_index, not both")
            if (not isinstance(logits_index, torch.Tensor) or logits_index.dtype != torch.int64
                    or logits_index.dim() != 1):
                raise TypeError(f"DiT.forward: logits_index must be an int64 tensor [N], got {logits_index!r}")
            if check and logits_index.numel() and (int(logits_index.min()) < 0
                                                   or int(logits_index.max()) >= B * S):
                raise ValueError(f"DiT.forward: logits_index must lie in [0, B·S = {B * S})")
        mask.check_shapes(S, key_length, B, context="DiT.forward")
        cond = None
        if c.family == "gamma":
            if not isinstance(sigma, torch.Tensor) or not sigma.dtype.is_floating_point:
                raise TypeError("DiT.forward: the gamma family needs sigma, a float tensor [B, S] of total "
                                f"noise σ̄, got {getattr(sigma, 'dtype', type(sigma).__name__)}")
            if sigma.dim() != 2 or sigma.shape[1] != S or sigma.shape[0] not in (1, B):
                raise ValueError(f"DiT.forward: sigma must have shape [B={B}, S={S}] (or [1, S]), got "
                                 f"{tuple(sigma.shape)}")
            sigma = sigma.expand(B, S)
            h = self.vocab_embed(input_ids, sigma, c.gamma)
            cond = F.silu(self.sigma_map(sigma))
        else:
            h = self.vocab_embed(input_ids)
        cos, sin = self.rotary_emb(position_ids)
        for layer, block in enumerate(self.blocks):
            h = block(h, cos, sin, mask, cond, kv_cache, layer, check)
        if logits_index is not None:
            h = h.reshape(B * S, -1).index_select(0, logits_index.to(h.device))
        else:
            h = _select_rows(h, logits_rows)
        logits = self.output_layer(h)
        return logits.to(_compute_dtype(logits.dtype))
