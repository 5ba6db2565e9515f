"""QMissTrainer: transformers' Trainer for a qmiss model (qmiss-train's, and the base of qmiss.trl's trainers).

Checkpoints hold the adapter, never the frozen base (the model's own ``save_pretrained``:
:mod:`qmiss.methods`); each finished checkpoint is marked complete, so resuming skips one cut
short; a non-finite loss stops the run, on every rank, naming the first module whose output went
non-finite. The loss is checked without a host sync per micro-step: a device flag gathers what each
micro-step saw and is read (all ranks at once) only before a step the Trainer logs, evaluates, saves or
stops after, before that step's optimizer step, and again before any save.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.trainer_callback import DefaultFlowCallback, TrainerControl

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


class NonfiniteLoss:
    """Watches a run's losses for NaN or inf without a host sync per micro-step.

    :meth:`record` keeps, on the loss's device, whether any loss so far was non-finite, and the step and value
    of the first (one ``torch.where``, no ``.item()``). :meth:`check` reads that once: summed over the ranks
    first, so every rank takes the same branch, and on a non-finite loss every rank runs the diagnosing forward
    (DDP broadcasts buffers and FSDP all-gathers in it: one rank alone would wait on the others for ever).
    """

    def __init__(self) -> None:
        self.first: Optional[torch.Tensor] = None  # (3,) fp64: seen (0/1), step, loss of the first non-finite one
        self.pending = 0  # micro-steps recorded since the last check
        self.inputs: Optional[dict] = None  # the last micro-batch, for the diagnosing forward

    def record(self, loss: torch.Tensor, step: int, inputs: dict) -> None:
        loss = loss.detach().double()
        bad = ~torch.isfinite(loss).all()
        if self.first is None:
            self.first = torch.zeros(3, dtype=torch.float64, device=loss.device)
        now = torch.stack([bad.double(), loss.new_full((), float(step)), loss.sum()])  # no host-to-device copy
        self.first = torch.where(bad & (self.first[0] == 0), now, self.first)
        self.pending += 1
        self.inputs = inputs

    def check(self, model: torch.nn.Module, prepare: Callable[[dict], dict] = lambda inputs: inputs) -> None:
        """Raise FloatingPointError on every rank if any rank recorded a non-finite loss since the run began;
        nothing on any rank otherwise. One all-reduce (under torch.distributed) and one host sync."""
        if self.pending == 0:
            return
        self.pending = 0
        flag = self.first[:1].clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag)
        if flag.item() == 0:
            return
        culprit = first_nonfinite_module(model, prepare(self.inputs))
        seen, step, value = self.first.tolist()
        what = f"non-finite loss ({value}) at step {int(step)}" if seen else "non-finite loss on another rank"
        where = f"; first non-finite output on the last micro-batch: {culprit}" if culprit else ""
        raise FloatingPointError(
            f"{what}{where}; stopped before the next optimizer step or save, nothing saved since — lower "
            "--learning_rate, check the data, or resume from a checkpoint")


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
    on a non-finite loss (:class:`NonfiniteLoss`, checked before each step that logs, evaluates, saves or ends
    the run) before anything poisoned is saved. (Saves hold the adapter, never the
    frozen base, through the model's own ``save_pretrained``: see qmiss/methods.py.)"""

    def train(self, *args, **kwargs):
        """A fresh non-finite record per run: one caught in an earlier ``train()`` of this trainer (a notebook's
        retry, a resume, ``auto_find_batch_size``'s re-entry) must not stop the next."""
        self._nonfinite = NonfiniteLoss()
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs) -> torch.Tensor:
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not hasattr(self, "_nonfinite"):
            self._nonfinite = NonfiniteLoss()
        self._nonfinite.record(loss, self.state.global_step + 1, inputs)
        if self.accelerator.sync_gradients and self._next_step_reports():  # before its optimizer step
            self._nonfinite.check(model, self._prepare_inputs)
        return loss

    def _next_step_reports(self) -> bool:
        """Whether the Trainer logs, evaluates, saves or stops after the optimizer step about to run: transformers'
        own rule (DefaultFlowCallback.on_step_end) asked on a copy of the state one step on."""
        state = copy.copy(self.state)
        state.global_step += 1
        control = DefaultFlowCallback().on_step_end(self.args, state, TrainerControl())
        return control.should_log or control.should_evaluate or control.should_save or control.should_training_stop

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, *args, **kwargs) -> None:
        control = self.control  # other callbacks, epoch strategies: checked here too, before anything is saved
        if hasattr(self, "_nonfinite") and (control.should_log or control.should_evaluate or control.should_save
                                             or control.should_training_stop):
            self._nonfinite.check(model, self._prepare_inputs)
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, *args, **kwargs)

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
