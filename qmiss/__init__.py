"""qmiss: MiSS adapters on a bitsandbytes 4-bit / 8-bit base.

    >>> model = qmiss.prepare_qmiss(model, r=64, bits=4)   # quantize, wrap, freeze
    >>> qmiss.trainable_parameters(model)
"""

from qmiss.adapters import load_adapter, read_adapter, save_adapter
from qmiss.config import QMissConfig, __version__
from qmiss.export import export_lora, export_merged
from qmiss.fsdp import fsdp_auto_wrap_policy, fsdp_mixed_precision
from qmiss.layer import MissLinear
from qmiss.memory import PeakReport, measure_peak, resident_bytes
from qmiss.methods import merge_and_unload
from qmiss.model import adapter_state_dict, disable_adapter, merge, miss_layers, trainable_parameters, unmerge
from qmiss.plan import MemoryPlan, plan_memory
from qmiss.prepare import from_pretrained, prepare_qmiss

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
