"""qmiss.trl on SmolLM2: DPO and KTO against the adapters-off reference (no second model), saves, resume, ORPO.

SmolLM2-135M-Instruct's real weights, loaded in fp32 with its first 4 decoder layers only
(``num_hidden_layers=4``; the other 26 are never read) so that a step takes seconds on a 2-core
CPU, quantized to nf4 with r=16 adapters. The data are a few prompt / chosen / rejected rows
built here; with the adapters at zero the policy *is* the reference, so the first DPO loss is
exactly ln 2 and the first KTO loss exactly 1/2.
"""

from __future__ import annotations

import copy
import gc
import importlib
import math
import sys
import warnings

import pytest
import torch
from torch import nn

import qmiss
from tests.helpers import randomize_adapters

ROWS = [  # (prompt, chosen, rejected)
    ("What is the capital of France?", " The capital of France is Paris.", " I don't know."),
    ("What is 2 + 3?", " 2 + 3 = 5.", " I don't know."),
    ("Name a primary colour.", " Red is a primary colour.", " I don't know."),
    ("What do bees make?", " Bees make honey.", " I don't know."),
]


@pytest.fixture(scope="module")
def trl():
    return pytest.importorskip("trl", reason="trl is not installed (pip install trl)")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def smollm2_4bit(path) -> nn.Module:
    """SmolLM2's first 4 decoder layers in fp32, prepared in 4-bit (nf4) with zero r=16 adapters."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=4, dtype=torch.float32)
    return qmiss.prepare_qmiss(model, r=16, bits=4)


@pytest.fixture
def model(smollm2_dir) -> nn.Module:
    return smollm2_4bit(smollm2_dir)


def pairs(n: int = 2):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in ROWS[:n]])


def config(config_class, out, **overrides):
    settings = dict(output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-3, max_length=64, bf16=False,
                    use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True)
    settings.update(overrides)
    return config_class(**settings)


def logged(trainer, key: str) -> dict[int, float]:
    """``{step: value}`` of a logged metric."""
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


def storages(*modules: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}


def pretrained_models() -> int:
    from transformers import PreTrainedModel

    gc.collect()
    return sum(isinstance(o, PreTrainedModel) for o in gc.get_objects())


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any ``from_pretrained`` of a model (TRL's reference loader ends in one) fails the test."""
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"a second model was loaded: {cls.__name__}.from_pretrained{args}")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


@pytest.fixture(scope="module")
def dpo_run(trl, smollm2_dir, tokenizer, tmp_path_factory):
    """Three DPO steps on one fixed batch (2 pairs, batch 2), a checkpoint after each, then ``save_model``."""
    from qmiss.trl import DPOTrainer

    out = tmp_path_factory.mktemp("dpo")
    trainer = DPOTrainer(smollm2_4bit(smollm2_dir), train_dataset=pairs(), processing_class=tokenizer,
                         args=config(trl.DPOConfig, out, max_steps=3, save_strategy="steps", save_steps=1))
    trainer.train()
    trainer.save_model()
    return trainer, out


@pytest.mark.slow
def test_dpo_holds_no_second_model(trl, model, tokenizer, tmp_path, no_model_loads) -> None:
    from qmiss.trl import DPOTrainer

    args = config(trl.DPOConfig, tmp_path, max_steps=1)
    with pytest.raises(AssertionError, match="a second model was loaded"):  # the check catches TRL's own default
        trl.DPOTrainer(model, ref_model=None, args=args, train_dataset=pairs(), processing_class=tokenizer)
    models = pretrained_models()
    trainer = DPOTrainer(model, args=args, train_dataset=pairs(), processing_class=tokenizer)
    assert trainer.ref_model is None
    assert pretrained_models() == models  # no LlamaForCausalLM was built, by from_pretrained or otherwise
    held = [v for v in vars(trainer).values() if isinstance(v, nn.Module)] + list(trainer.accelerator._models)
    assert storages(*held) == storages(model)


@pytest.mark.slow
def test_dpo_first_step_is_ln2_with_zero_rewards(dpo_run) -> None:
    trainer, _ = dpo_run
    assert logged(trainer, "loss")[1] == pytest.approx(math.log(2), abs=1e-3)
    for key in ["rewards/chosen", "rewards/rejected", "rewards/margins"]:
        assert logged(trainer, key)[1] == 0.0, key  # policy and reference are the same weights at step 1


@pytest.mark.slow
def test_dpo_steps_lower_the_loss(dpo_run) -> None:
    trainer, _ = dpo_run
    loss = logged(trainer, "loss")
    assert loss[3] < loss[2] < loss[1]
    assert logged(trainer, "rewards/margins")[3] > 0


@pytest.mark.slow
def test_dpo_saves_the_adapter_not_the_base(dpo_run) -> None:
    trainer, out = dpo_run
    for folder in (out, out / "checkpoint-1", out / "checkpoint-3"):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names, folder
        assert not any(n.startswith("model") and n.endswith((".safetensors", ".bin")) for n in names), names
    saved = qmiss.read_adapter(out)[1]
    assert all(torch.equal(saved[n], layer.miss_block.detach()) for n, layer in qmiss.miss_layers(trainer.model))


@pytest.mark.slow
def test_dpo_resume_keeps_the_adapter_free_reference(trl, dpo_run, smollm2_dir, tokenizer, tmp_path) -> None:
    """Resumed from checkpoint-1, step 2 reproduces the uninterrupted run's loss, and the reference is still the base.

    The step-2 loss depends only on the adapter after step 1 and the reference, so it does not see
    that this run's schedule is sized for 2 steps, the first one's for 3.
    """
    from qmiss.trl import DPOTrainer

    first, out = dpo_run
    model = smollm2_4bit(smollm2_dir)
    trainer = DPOTrainer(model, args=config(trl.DPOConfig, tmp_path, max_steps=2), train_dataset=pairs(),
                         processing_class=tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    base = trainer.compute_ref_log_probs(trainer.model, batch)  # adapters still zero: the base model's log-probs
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert trainer.state.global_step == 2
    assert all(layer.miss_block.abs().sum() > 0 for _, layer in qmiss.miss_layers(model))
    after = trainer.compute_ref_log_probs(trainer.model, batch)
    assert all(torch.equal(a, b) for a, b in zip(base, after))
    assert logged(trainer, "loss")[2] == pytest.approx(logged(first, "loss")[2], rel=1e-4)


@pytest.mark.slow
def test_precomputed_reference_is_the_base_even_with_trained_adapters(trl, model, tokenizer, tmp_path) -> None:
    """``precompute_ref_log_probs=True``: TRL's one pass over the data runs with the adapters off."""
    from qmiss.trl import DPOTrainer

    randomize_adapters(model)
    with pytest.warns(UserWarning, match="adapters are not zero"):
        trainer = DPOTrainer(model, args=config(trl.DPOConfig, tmp_path, precompute_ref_log_probs=True),
                             train_dataset=pairs(), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))

    def completion_logps() -> torch.Tensor:  # summed over completion tokens, computed here without TRL
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        token = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        return (token * batch["completion_mask"][:, 1:]).sum(1)

    with qmiss.disable_adapter(model):
        base = completion_logps()
    stored = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    torch.testing.assert_close(stored, base, rtol=1e-4, atol=1e-3)
    assert (stored - completion_logps()).abs().max() > 0.1  # the adapters do change the log-probs


@pytest.mark.slow
def test_an_explicit_ref_model_is_used_as_given(trl, model, tokenizer, tmp_path) -> None:
    from qmiss.trl import DPOTrainer

    reference = copy.deepcopy(model)
    randomize_adapters(reference)  # a reference that differs from the policy's starting point
    trainer = DPOTrainer(model, ref_model=reference, args=config(trl.DPOConfig, tmp_path), train_dataset=pairs(),
                         processing_class=tokenizer)
    assert trainer.ref_model is reference
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()  # TRL files the metrics under "train"
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert abs(loss.item() - math.log(2)) > 1e-2
    assert trainer._metrics["train"]["rewards/margins"][-1] != 0.0


@pytest.mark.slow
def test_dpo_refuses_what_it_cannot_honour(trl, model, tokenizer, tmp_path) -> None:
    from peft import LoraConfig

    from qmiss.trl import DPOTrainer

    common = dict(train_dataset=pairs(), processing_class=tokenizer)
    with pytest.raises(ValueError, match="sync_ref_model=True: DPOTrainer's reference is the model with its adapters "
                                         "disabled .* set sync_ref_model=False"):
        DPOTrainer(model, args=config(trl.DPOConfig, tmp_path, sync_ref_model=True), **common)
    with pytest.raises(ValueError, match="peft_config: LlamaForCausalLM already carries qmiss adapters; drop "
                                         "peft_config"):
        DPOTrainer(model, args=config(trl.DPOConfig, tmp_path), peft_config=LoraConfig(r=8), **common)
    with pytest.raises(ValueError, match="trains a qmiss model, got 'some/model'; load it, call "
                                         r"qmiss.prepare_qmiss\(model, ...\)"):
        DPOTrainer("some/model", args=config(trl.DPOConfig, tmp_path), **common)


@pytest.mark.slow
def test_kto_holds_no_second_model_and_starts_at_one_half(trl, model, tokenizer, tmp_path, no_model_loads) -> None:
    from datasets import Dataset

    from qmiss.trl import KTOTrainer

    rows = [{"prompt": p, "completion": c, "label": True} for p, c, _ in ROWS[:2]]
    rows += [{"prompt": p, "completion": r, "label": False} for p, _, r in ROWS[:2]]
    models = pretrained_models()
    trainer = KTOTrainer(model, args=config(trl.KTOConfig, tmp_path, max_steps=1, per_device_train_batch_size=4),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert trainer.ref_model is None and pretrained_models() == models
    trainer.train()
    # policy == reference: every log-ratio and the KL estimate are 0, so each loss term is 1 - sigmoid(0)
    assert logged(trainer, "loss")[1] == pytest.approx(0.5, abs=1e-3)
    assert logged(trainer, "kl")[1] == 0.0 and logged(trainer, "rewards/margins")[1] == 0.0
    assert all(layer.miss_block.abs().sum() > 0 for _, layer in qmiss.miss_layers(model))


@pytest.mark.slow
def test_reference_free_orpo_trains_a_qmiss_model(trl, model, tokenizer, tmp_path) -> None:
    with warnings.catch_warnings():  # trl.experimental announces itself
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    start = {n: layer.miss_block.detach().clone() for n, layer in qmiss.miss_layers(model)}
    trainer = ORPOTrainer(model, args=config(ORPOConfig, tmp_path, max_steps=1), train_dataset=pairs(),
                          processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(logged(trainer, "loss")[1])
    assert all(not torch.equal(start[n], layer.miss_block) for n, layer in qmiss.miss_layers(model))


def test_import_without_trl_names_the_fix(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "trl", None)  # what an environment without trl looks like to `import trl`
    monkeypatch.delitem(sys.modules, "qmiss.trl", raising=False)
    with pytest.raises(ImportError, match=r"qmiss.trl needs TRL.*: pip install trl"):
        importlib.import_module("qmiss.trl")
