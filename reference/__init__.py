"""hdlm_reference: the pure-PyTorch harness of DESIGN.md §8 (model, noise processes, losses,
samplers, trainer, evaluation), installed from ``reference/`` under the import name
``hdlm_reference``. It imports hdlm_kernels for schedules, masks, packing and the backends it
plugs in; hdlm_kernels never imports it.
"""

import hdlm_kernels  # noqa: F401
