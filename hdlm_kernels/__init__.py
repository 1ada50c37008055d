"""hdlm-kernels: GPU kernels for hyperschedule diffusion language models (HDLM).

Hyperschedules and their attention masks, training interval packing, attention and fused sampling
kernels, each with a pure-PyTorch reference twin. ``hk.info()`` tells which backends (reference,
C++, CUDA, Triton) work on this machine and why the others do not. See DESIGN.md §5 for the API.
"""

import torch  # noqa: F401 - first, so that libtorch is loaded before the compiled extension

# isort: split
from . import sampling
from .info import info

# isort: split
# Hyperschedules, masks and packing (DESIGN.md §3-4).
from . import masks, packing, schedules
from . import attention
from .kv_cache import KVCache

__version__ = "0.1.0"

__all__ = ["__version__", "KVCache", "attention", "info", "masks", "packing", "sampling", "schedules"]
