"""hdlm_reference: the pure-PyTorch harness of DESIGN.md §8 (model, noise processes, losses,
samplers, trainer, evaluation), installed from ``reference/`` under the import name
``hdlm_reference``. It imports hdlm_kernels for schedules, masks, packing and the backends it
plugs in; hdlm_kernels never imports it. See reference/README.md.

    import hdlm_reference as hr
    model = hr.DiT(hr.ModelConfig.preset("tiny", family="epsilon"))
    out = hr.generate(model.eval(), hk.schedules.block(128, 16, 16), batch_size=4, seed=0, kv_cache=True)
"""

import hdlm_kernels  # noqa: F401 - the kernels package (and torch) first

from . import evaluate, losses, noise
from .generate import GenerationResult, generate
from .model import DiT, ModelConfig
from .objective import ObjectiveConfig, PackedObjective
from .tokenizer import ByteTokenizer
from .trainer import TrainConfig, train

__all__ = ["ByteTokenizer", "DiT", "GenerationResult", "ModelConfig", "ObjectiveConfig", "PackedObjective",
           "TrainConfig", "evaluate", "generate", "losses", "noise", "train"]
