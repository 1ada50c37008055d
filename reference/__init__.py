"""hdlm_reference: the pure-PyTorch harness (model, noise processes, losses, samplers, trainer,
evaluation), installed from ``reference/`` under the import name ``hdlm_reference``
(docs/architecture.md). It imports hdlm_kernels for schedules, masks, packing and the backends it
plugs in; hdlm_kernels never imports it. See reference/README.md.

    import hdlm_reference as hr
    model = hr.DiT(hr.ModelConfig.preset("tiny", family="epsilon"))
    out = hr.generate(model.eval(), hk.schedules.block(128, 16, 16), batch_size=4, seed=0, kv_cache=True)

    m = hr.load_pretrained("hdlm-group/hdlm-base-gamma-0.01")        # a published model (hub or cache)
    out = hr.generate(m.model, m.schedule(), 2, seed=0, kv_cache=True, **m.sample_options())
    print(m.tokenizer.decode(out.tokens[0]))
"""

import hdlm_kernels  # noqa: F401 - the kernels package (and torch) first

from . import conditioning, evaluate, losses, noise
from .generate import GenerationResult, generate
from .model import DiT, ModelConfig
from .objective import ObjectiveConfig, PackedObjective
from .pretrained import ModelNotAvailableError, Pretrained, PretrainedError, load_pretrained, load_run
from .tokenizer import ByteTokenizer
from .tokenizer_spec import load_tokenizer
from .trainer import TrainConfig, train

__all__ = ["ByteTokenizer", "DiT", "GenerationResult", "ModelConfig", "ModelNotAvailableError", "ObjectiveConfig",
           "PackedObjective", "Pretrained", "PretrainedError", "TrainConfig", "conditioning", "evaluate",
           "generate", "load_pretrained", "load_run", "load_tokenizer", "losses", "noise", "train"]
