"""QMissTrainer: transformers' Trainer for a qmiss model (qmiss-train's, and the base of qmiss.trl's trainers).

Checkpoints hold the adapter, never the frozen base (the model's own ``save_pretrained``:
:mod:`qmiss.methods`); each finished checkpoint is marked complete, so resuming skips one cut
short; a non-finite loss stops the run before the optimizer step, naming the first module whose
output went non-finite.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
from transformers import Trainer

from qmiss.adapters import atomic_write_json, load_adapter
from qmiss.fsdp import update_fsdp_plugin


def first_nonfinite_module(model: torch.nn.Module, inputs: dict) -> Optional[str]:
    """Re-run a forward pass and name the first module (in execution order) whose output is NaN or inf."""
    found: list[str] = []

    def hook(name: str):
        def check(module, args, output) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "logits", output)
            if not found and isinstance(out, torch.Tensor) and out.is_floating_point() and not out.isfinite().all():
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


COMPLETE_MARKER = "qmiss_checkpoint_complete.json"


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``output_dir`` whose save finished (half-written ones skipped, with a warning)."""
    folders = sorted((p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                     key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for folder in folders:
        if (folder / COMPLETE_MARKER).is_file():
            return str(folder)
        warnings.warn(f"{folder} is incomplete (its save was interrupted); skipping it for an earlier checkpoint")
    return None


class QMissTrainer(Trainer):
    """A Trainer that resumes from adapter-only checkpoints, marks each finished checkpoint complete, and stops
    on a non-finite loss before an optimizer step can poison the adapter. (Saves hold the adapter, never the
    frozen base, through the model's own ``save_pretrained``: see qmiss/methods.py.)"""

    def training_step(self, model, inputs, *args, **kwargs) -> torch.Tensor:
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not torch.isfinite(loss).all():
            culprit = first_nonfinite_module(model, self._prepare_inputs(inputs))
            where = f"; first non-finite output: {culprit}" if culprit else ""
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1}{where}; stopped before the "
                "optimizer step, nothing saved — lower --learning_rate, check the data, or resume from a checkpoint")
        return loss

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.is_fsdp_enabled:  # as transformers does for PEFT models: adapters in units of their own
            update_fsdp_plugin(self.accelerator.state.fsdp_plugin, self.model)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:  # the commit record, written last: a folder without it was cut short
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            atomic_write_json(folder / COMPLETE_MARKER, {"global_step": self.state.global_step})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter(model or self.model, resume_from_checkpoint, trainable=True)

    def _load_best_model(self) -> None:
        load_adapter(self.model, self.state.best_model_checkpoint, trainable=True)
