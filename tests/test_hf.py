"""A PEFT user's habits on a qmiss model: save_pretrained and Trainer saves write the adapter, PEFT's methods,
transformers' dtype guards and attention target dtype (qmiss/hf.py, qmiss/methods.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qmiss
from qmiss.methods import METHODS
from tests.helpers import load, mode_kwargs, randomize_adapters, tiny_llama

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "qmiss_config.json"}


def _prepared(mode: str = "default", seed: int = 1):
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, **mode_kwargs(mode))
    randomize_adapters(model, seed=seed)
    return model


def _assert_adapter_folder(folder: Path, ids: torch.Tensor, logits: torch.Tensor, mode: str = "default",
                           **tiny: int) -> None:
    """The folder holds an adapter and no base weights; qmiss and PEFT both load it to the same logits."""
    from peft import PeftModel

    names = {p.name for p in folder.iterdir()}
    assert ADAPTER_FILES <= names, names
    assert not any(n.startswith("model") and n.endswith(".safetensors") for n in names), names  # no packed base
    ours = qmiss.from_pretrained(tiny_llama(**tiny), folder)
    torch.testing.assert_close(ours(ids).logits, logits, rtol=0, atol=0)
    base = qmiss.prepare_qmiss(tiny_llama(**tiny), r=16, bits=4, **mode_kwargs(mode)).unload()  # same 4-bit weights
    theirs = PeftModel.from_pretrained(base, folder)
    torch.testing.assert_close(theirs(ids).logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["default", "bat"])
def test_save_pretrained_writes_the_adapter(tmp_path, mode: str) -> None:
    model = _prepared(mode)
    ids = torch.randint(0, 256, (2, 8))
    logits = model(ids).logits.detach()
    model.save_pretrained(tmp_path / "adapter")
    _assert_adapter_folder(tmp_path / "adapter", ids, logits, mode)


def test_save_pretrained_takes_a_wrappers_state_dict(tmp_path) -> None:
    """transformers' Trainer hands a DDP-wrapped model's state_dict() ("module."-prefixed keys) to save_pretrained."""
    model = _prepared()
    model.save_pretrained(tmp_path / "plain")
    wrapped = {f"module.{key}": value for key, value in model.state_dict().items()}
    model.save_pretrained(tmp_path / "ddp", state_dict=wrapped)
    for name in ADAPTER_FILES:
        assert (tmp_path / "ddp" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name


def _trainer(model, out: Path, **kwargs):
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, 256, (8, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                             use_cpu=True, **kwargs)
    return Trainer(model=model, args=args, train_dataset=data)


def test_trainer_save_model_and_its_checkpoints_write_the_adapter(tmp_path) -> None:
    model = _prepared()
    trainer = _trainer(model, tmp_path / "run", max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    trainer.save_model()
    ids = torch.randint(0, 256, (2, 8))
    logits = model(ids).logits.detach()
    _assert_adapter_folder(tmp_path / "run", ids, logits)
    _assert_adapter_folder(tmp_path / "run" / "checkpoint-1", ids, logits)


def test_trainer_accepts_a_bitsandbytes_model_that_stays_quantized(tmp_path, tiny_dir: str) -> None:
    model = qmiss.prepare_qmiss(load(tiny_dir, 4), r=16)
    assert model.is_quantized is True  # transformers' own flag is left as it set it
    _trainer(model, tmp_path / "run", max_steps=1, save_strategy="no").train()
    with pytest.raises(ValueError, match="not supported for quantized model"):  # transformers' guard still in force
        model.half()


def test_trl_sft_trainer_save_model_writes_the_adapter(tmp_path, smollm2_dir) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = qmiss.prepare_qmiss(tiny_llama(vocab_size=len(tokenizer)), r=16, bits=4)
    data = Dataset.from_list([{"text": f"{a} + {a} = {2 * a}"} for a in range(8)])
    config = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=4, bf16=False,
                       use_cpu=True, report_to=[], save_strategy="no", max_length=32)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    ids = torch.randint(0, len(tokenizer), (2, 8))
    _assert_adapter_folder(tmp_path / "sft", ids, model(ids).logits.detach(), vocab_size=len(tokenizer))


# --- PEFT's methods -----------------------------------------------------------------------------------------------


def test_print_trainable_parameters_is_pefts_line(capsys) -> None:
    model = _prepared()
    model.print_trainable_parameters()
    assert capsys.readouterr().out.startswith("trainable params: ")
    assert model.get_nb_trainable_parameters() == qmiss.trainable_parameters(model, verbose=False)


@pytest.mark.parametrize("mode", ["default", "bat"])
def test_disable_adapter_gives_the_base_logits(mode: str) -> None:
    model = _prepared(mode)
    ids = torch.randint(0, 256, (2, 8))
    base = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, **mode_kwargs(mode))(ids).logits
    adapted = model(ids).logits
    assert (adapted - base).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, base, rtol=1e-6, atol=1e-6)
    model.disable_adapters()
    assert model.active_adapters() == []
    torch.testing.assert_close(model(ids).logits, base, rtol=1e-6, atol=1e-6)
    model.enable_adapters()
    assert model.active_adapters() == ["default"]
    torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)


def test_merge_and_unload_is_a_plain_model_with_the_same_logits() -> None:
    model = _prepared()
    ids = torch.randint(0, 256, (2, 8))
    logits = model(ids).logits.detach()
    merged = model.merge_and_unload(dtype=torch.float32)
    assert not any(isinstance(m, qmiss.MissLinear) for m in merged.modules())
    assert not any(name in merged.__dict__ for name in METHODS)
    torch.testing.assert_close(merged(ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_unload_and_get_base_model() -> None:
    model = _prepared()
    assert model.get_base_model() is model
    ids = torch.randint(0, 256, (2, 8))
    with model.disable_adapter():
        base = model(ids).logits.detach()
    unloaded = model.unload()
    assert not any(isinstance(m, qmiss.MissLinear) for m in unloaded.modules())
    assert not hasattr(unloaded, "qmiss_config")
    torch.testing.assert_close(unloaded(ids).logits, base, rtol=0, atol=0)


# --- dtype guards and the attention target dtype -----------------------------------------------------------------


@pytest.mark.parametrize("cast", ["half", "float", "bfloat16"])
def test_casts_leave_packed_uint8_bytes_alone(cast: str) -> None:
    model = _prepared()
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    packed = layer.weight.detach().clone()
    getattr(model, cast)()
    assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, packed)
    dtype = {"half": torch.float16, "float": torch.float32, "bfloat16": torch.bfloat16}[cast]
    assert model.model.embed_tokens.weight.dtype == dtype


@pytest.mark.parametrize("call", [lambda m: m.half(), lambda m: m.float(), lambda m: m.to(torch.float16)],
                         ids=["half", "float", "to-dtype"])
def test_casts_of_float_stored_packed_bytes_are_refused(call) -> None:
    model = qmiss.prepare_qmiss(tiny_llama().to(torch.bfloat16), r=16, bits=4, quant_storage=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    packed = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="stores its packed 4-bit bytes as torch.bfloat16"):
        call(model)
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight.view(torch.uint8), packed.view(torch.uint8))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # nothing was cast
    model.to("cpu")  # a device move is no cast


def test_flash_attention_target_dtype_is_the_models_not_the_packed_weights(tiny_dir: str) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.integrations.flash_attention import get_target_dtype

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)  # config.dtype: bf16
    model = qmiss.prepare_qmiss(model, r=16, bits=4, compute_dtype=torch.bfloat16)
    query = torch.zeros(1, 2, 4, 16)  # fp32, no autocast: the case transformers must pick a dtype for
    assert get_target_dtype(query, model.model.layers[0].self_attn) == torch.bfloat16


def test_transformers_adapter_methods_speak_for_the_one_adapter(tmp_path) -> None:
    model = _prepared()
    qmiss.save_adapter(model, tmp_path)
    state = model.get_adapter_state_dict()
    assert set(state) == {f"{name}.miss_block" for name, _ in qmiss.miss_layers(model)}
    fresh = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4)
    fresh.load_adapter(str(tmp_path))
    ids = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    for call in ("add_adapter", "set_adapter", "delete_adapter"):
        with pytest.raises(ValueError, match=f"model.{call}: a qmiss model holds one MiSS adapter per layer"):
            getattr(model, call)("other")


def test_a_prepared_model_pickles_with_its_methods() -> None:
    import pickle

    model = _prepared()
    model.disable_input_require_grads()  # transformers' own input-grad hook is a local function: it never pickles
    copy = pickle.loads(pickle.dumps(model))
    ids = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(copy(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert copy.get_base_model() is copy
