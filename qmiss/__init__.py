"""qmiss: MiSS adapters on a bitsandbytes 4-bit / 8-bit base.

    >>> model = qmiss.prepare_qmiss(model, r=64, bits=4)   # quantize, wrap, freeze
    >>> qmiss.trainable_parameters(model)
"""

from qmiss.config import QMissConfig
from qmiss.layer import MissLinear
from qmiss.model import adapter_state_dict, disable_adapter, miss_layers, prepare_qmiss, trainable_parameters

__version__ = "0.1.0"

__all__ = [
    "MissLinear",
    "QMissConfig",
    "adapter_state_dict",
    "disable_adapter",
    "miss_layers",
    "prepare_qmiss",
    "trainable_parameters",
    "__version__",
]
