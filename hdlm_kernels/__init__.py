"""hdlm-kernels: GPU kernels for hyperschedule diffusion language models (HDLM).

Hyperschedules and their attention masks, training interval packing, attention and fused sampling
kernels, each with a pure-PyTorch reference twin. Every op's implementations are registered in one
place, :mod:`hdlm_kernels.backends`, which also holds the one rule by which ``backend="auto"`` chooses
among them; ``hk.info()`` renders that registry for this machine. See docs/architecture.md.
"""

import torch  # noqa: F401 - first, so that libtorch is loaded before the compiled extension

# isort: split
from . import attention, backends, masks, packing, sampling, schedules
from ._version import __version__
from .info import info
from .kv_cache import KVCache

__all__ = ["__version__", "KVCache", "attention", "backends", "info", "masks", "packing", "sampling", "schedules"]
