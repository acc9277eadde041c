"""Self-supervised pretraining: a method is views + heads + weighted loss terms (DESIGN.md).

``run_pretrain(config, data, out, ...)`` is the job behind ``medcl pretrain``; methods by name are the
YAML files in ``configs/pretrain/`` (see :func:`medcl.pretrain.methods.method_config`).
"""

from medcl.pretrain.config import PretrainConfig
from medcl.pretrain.run import run_pretrain

__all__ = ["PretrainConfig", "run_pretrain"]
