"""TRL's preference trainers on a qmiss model, scored against the same quantized model with its adapters off.

    >>> from qmiss.trl import DPOTrainer                 # pip install trl
    >>> model = qmiss.prepare_qmiss(model, r=64, bits=4)
    >>> DPOTrainer(model, args=DPOConfig(...), train_dataset=pairs, processing_class=tokenizer).train()

DPO and KTO compare the policy with a reference: the model training started from. For a
``PeftModel`` TRL gets it by switching the adapter off; for any other model, and so for a qmiss
model, it loads a second model from ``config._name_or_path`` (``trl/trainer/dpo_trainer.py``,
"Reference model" in ``__init__``). That second model is the unquantized base: 13.5 GB more for a
7B in bf16, and not the 4-bit weights the policy starts from, so the first loss is not ln 2.

Here the reference is the policy itself under :func:`qmiss.disable_adapter`::

    reference log-probs   x ─► quantized base (adapters off, no grad) ─► log p_ref   } the same
    policy log-probs      x ─► quantized base + MiSS adapters        ─► log p       } weights

- No second model: while TRL's ``__init__`` runs, its reference loader (the module's
  ``create_model_from_path``) answers None, so ``trainer.ref_model`` is None, as TRL leaves it for PEFT.
- Every step computes the reference log-probs first, then hands them to TRL in the batch, the way
  ``precompute_ref_log_probs=True`` hands over stored ones; they are freed before the policy's
  forward, so the reference adds no activations to the policy's. ``precompute_ref_log_probs=True``
  works as in TRL and computes them once, adapters off.
- ``save_model`` and checkpoints write the adapter in PEFT's MiSS format and resuming loads it back
  (:class:`qmiss.train.QMissTrainer`); the reference needs nothing restored, it is always the base.
- The reference is the base, so it equals the starting point only for zero adapters (a fresh
  ``prepare_qmiss``, or a run resumed from a checkpoint, whose adapter loads after the reference is
  fixed). Adapters already trained when the trainer is built (DPO after SFT) get a warning: TRL would
  score against a frozen copy of them; here pass that model as ``ref_model``.
- An explicit ``ref_model`` is honoured as TRL honours it: the caller chose to hold that model.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from types import ModuleType
from typing import Any, Iterator, Mapping

import torch
from torch import nn

try:
    import trl
except ImportError as exc:
    raise ImportError("qmiss.trl needs TRL, an optional dependency of qmiss: pip install trl") from exc
try:
    from trl.trainer import dpo_trainer as _trl_dpo
    from trl.trainer import kto_trainer as _trl_kto
except ImportError as exc:
    raise ImportError(f"qmiss.trl needs TRL's DPOTrainer and KTOTrainer (trl>=1.16); trl {trl.__version__} "
                      "is installed: pip install -U 'trl>=1.16'") from exc

from qmiss.layer import MissLinear
from qmiss.model import disable_adapter, miss_layers
from qmiss.trainer import QMissTrainer

__all__ = ["DPOTrainer", "KTOTrainer"]

for _base in (_trl_dpo.DPOTrainer, _trl_kto.KTOTrainer):  # the hook overridden below, in its trl 1.x form
    if list(inspect.signature(_base.compute_ref_log_probs).parameters) != ["self", "model", "inputs"]:
        raise ImportError(f"qmiss.trl supports trl>=1.16, whose {_base.__name__}.compute_ref_log_probs(model, inputs) "
                          f"it overrides; trl {trl.__version__} is installed: pip install -U 'trl>=1.16'")
del _base


@contextlib.contextmanager
def _reference_loader_off(module: ModuleType) -> Iterator[list[str]]:
    """Inside it, ``module.create_model_from_path`` loads nothing and returns None; yields the paths it was asked for.

    TRL builds the default reference inline in ``__init__`` (no method to override), calling
    that function with the policy's ``config._name_or_path``. Given a model object, that call
    is its only use in ``__init__``.
    """
    asked: list[str] = []
    original = module.create_model_from_path

    def no_second_model(model_id: str, *args: Any, **kwargs: Any) -> None:
        asked.append(model_id)
        return None

    module.create_model_from_path = no_second_model
    try:
        yield asked
    finally:
        module.create_model_from_path = original


class _AdapterFreeReference:
    """What DPO and KTO share: the reference is the policy with its adapters disabled, never a second model.

    Placed before :class:`~qmiss.train.QMissTrainer` (adapter-only checkpoints) and the TRL
    trainer in the method order; each method ends in ``super()``, so TRL does the rest.
    """

    _trl_module: ModuleType  # the TRL module whose ``create_model_from_path`` would load the reference
    _reference_keys: tuple[str, ...]  # the batch keys TRL reads stored reference log-probs from

    def __init__(self, model: nn.Module, ref_model: nn.Module | None = None, args: Any = None, *more: Any,
                 **kwargs: Any) -> None:
        """TRL's arguments, unchanged; see TRL's trainer.

        Raises:
            ValueError: ``model`` is not a qmiss model (a path, or no :class:`~qmiss.MissLinear`), ``peft_config``
                is given, the output head carries an adapter, or ``sync_ref_model=True`` without a ``ref_model``.
            RuntimeError: the installed TRL built a reference model anyway.
        """
        bound = inspect.signature(super().__init__).bind(model, ref_model, args, *more, **kwargs)
        name = type(self).__name__
        if isinstance(model, str) or not any(True for _ in miss_layers(model)):
            got = model if isinstance(model, str) else type(model).__name__
            raise ValueError(f"qmiss.trl.{name} trains a qmiss model, got {got!r}; load it, call "
                             f"qmiss.prepare_qmiss(model, ...) and pass the model (or use trl.{name} for other models)")
        if bound.arguments.get("peft_config") is not None:
            raise ValueError(f"peft_config: {type(model).__name__} already carries qmiss adapters; drop peft_config "
                             "(one adapter per layer)")
        if isinstance(model.get_output_embeddings(), MissLinear):
            raise ValueError("lm_head carries a qmiss adapter, which TRL's log-prob head would skip (it reads "
                             "lm_head.weight directly); prepare the model without lm_head in target_modules")
        if ref_model is None and getattr(args, "sync_ref_model", False):
            raise ValueError(f"sync_ref_model=True: {name}'s reference is the model with its adapters disabled and "
                             "holds no weights to sync; set sync_ref_model=False, or pass a ref_model of your own")
        if ref_model is None and any(layer.miss_block.detach().count_nonzero() for _, layer in miss_layers(model)):
            warnings.warn(
                f"{name}: the model's adapters are not zero, and the reference is the model with its adapters "
                "disabled: the quantized base, not this starting point (as TRL's own PeftModel fallback). To score "
                "against the adapter you start from, pass ref_model=a second qmiss model holding it "
                "(qmiss.from_pretrained(model, adapter_dir)).", UserWarning, stacklevel=2)
        loader_off = _reference_loader_off(self._trl_module) if ref_model is None else contextlib.nullcontext([])
        with loader_off as asked:
            super().__init__(*bound.args, **bound.kwargs)
        if ref_model is None and self.ref_model is not None:
            raise RuntimeError(f"trl {trl.__version__} built a reference model for {name} by a path qmiss.trl does "
                               f"not know (asked for {asked}); qmiss.trl supports trl 1.16's layout")

    def compute_ref_log_probs(self, model: nn.Module, inputs: Mapping[str, Any]) -> tuple:
        """TRL's reference log-probs, computed with every adapter disabled (no ``ref_model``) — for the batch in
        :meth:`compute_loss` and for ``precompute_ref_log_probs`` alike."""
        if self.ref_model is not None:
            return super().compute_ref_log_probs(model, inputs)
        with disable_adapter(self.accelerator.unwrap_model(self.model)):
            return super().compute_ref_log_probs(model, inputs)

    def compute_loss(self, model: nn.Module, inputs: Mapping[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | None = None) -> Any:
        """TRL's loss, given this batch's reference log-probs (adapters off) as if they had been precomputed.

        TRL takes the reference from the batch when ``precompute_ref_logps`` is set and otherwise
        calls ``ref_model``, which is None here; the flag is set for this call only.
        """
        if self.ref_model is not None or self.precompute_ref_logps:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        reference = self.compute_ref_log_probs(self.model, inputs)  # no grad, before the policy's forward
        inputs = {**inputs, **{key: value for key, value in zip(self._reference_keys, reference) if value is not None}}
        self.precompute_ref_logps = True
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self.precompute_ref_logps = False


class DPOTrainer(_AdapterFreeReference, QMissTrainer, _trl_dpo.DPOTrainer):
    """``trl.DPOTrainer`` for a qmiss model: the reference is the model with adapters disabled, and saves
    hold the adapter (PEFT's MiSS format). Takes TRL's arguments; see the module docstring."""

    _trl_module = _trl_dpo
    _reference_keys = ("ref_chosen_logps", "ref_rejected_logps")  # compute_ref_log_probs: (chosen, rejected)


class KTOTrainer(_AdapterFreeReference, QMissTrainer, _trl_kto.KTOTrainer):
    """``trl.KTOTrainer`` for a qmiss model, as :class:`DPOTrainer`."""

    _trl_module = _trl_kto
    _reference_keys = ("ref_logps", "ref_KL_logps")  # compute_ref_log_probs: (completions, KL completions or None)
