"""qmiss: MiSS adapters on a bitsandbytes 4-bit / 8-bit base.

    >>> model = qmiss.prepare_qmiss(model, r=64, bits=4)   # quantize, wrap, freeze
    >>> qmiss.trainable_parameters(model)
"""

from qmiss.config import QMissConfig
from qmiss.fsdp import fsdp_auto_wrap_policy, fsdp_mixed_precision
from qmiss.io import (
    export_lora,
    export_merged,
    from_pretrained,
    load_adapter,
    merge,
    merge_and_unload,
    read_adapter,
    save_adapter,
    unmerge,
)
from qmiss.layer import MissLinear
from qmiss.memory import PeakReport, measure_peak, resident_bytes
from qmiss.plan import MemoryPlan, plan_memory
from qmiss.model import adapter_state_dict, disable_adapter, miss_layers, prepare_qmiss, trainable_parameters

__version__ = "0.1.0"

__all__ = [
    "MemoryPlan",
    "MissLinear",
    "PeakReport",
    "QMissConfig",
    "adapter_state_dict",
    "disable_adapter",
    "export_lora",
    "export_merged",
    "from_pretrained",
    "fsdp_auto_wrap_policy",
    "fsdp_mixed_precision",
    "load_adapter",
    "measure_peak",
    "merge",
    "merge_and_unload",
    "miss_layers",
    "plan_memory",
    "prepare_qmiss",
    "read_adapter",
    "resident_bytes",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
    "__version__",
]
