"""The one settings object: QMissConfig states every default once, prepare_qmiss, the planner and qmiss-train
read it, and a front end that defaults differently says so in config.FRONT_END_DEFAULTS."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import qmiss
from qmiss import cli, train
from qmiss.config import DEFAULTS, FRONT_END_DEFAULTS, QMissConfig
from qmiss.layer import adapter_shape, shape_problem
from qmiss.plan import plan_memory
from tests.helpers import tiny_llama, tiny_llama_config


def test_a_config_object_and_keyword_settings_prepare_the_same_model() -> None:
    by_keywords = qmiss.prepare_qmiss(tiny_llama(), r=16, mode="bat", bits=8)
    by_object = qmiss.prepare_qmiss(tiny_llama(), QMissConfig(r=16, mode="bat", bits=8))
    overridden = qmiss.prepare_qmiss(tiny_llama(), QMissConfig(r=16, mode="bat", bits=8), r=32)
    assert by_object.qmiss_config == by_keywords.qmiss_config
    assert overridden.qmiss_config.r == 32 and overridden.qmiss_config.mode == "bat"
    assert [tuple(p.shape) for p in by_object.parameters() if p.requires_grad] == \
        [tuple(p.shape) for p in by_keywords.parameters() if p.requires_grad]


@pytest.mark.parametrize("name, hint", [("lora_r", "did you mean 'r'"), ("miss_dropout", "did you mean 'dropout'"),
                                        ("flavour", "the settings are")])
def test_an_unknown_setting_is_named_with_the_fix(name: str, hint: str) -> None:
    with pytest.raises(TypeError, match=f"unexpected setting '{name}'; {hint}"):
        qmiss.prepare_qmiss(tiny_llama(), **{name: 8})


def test_init_weights_is_peft_spelling_of_the_mode() -> None:
    assert qmiss.prepare_qmiss(tiny_llama(), r=16, init_weights="bat").qmiss_config.mode == "bat"
    with pytest.raises(ValueError, match="disagree"):
        qmiss.prepare_qmiss(tiny_llama(), r=16, mode="mini", mini_r=8, init_weights="bat")


def test_the_command_states_no_default_of_its_own_but_the_ones_it_explains() -> None:
    """qmiss-train's flags default to QMissConfig's fields, except where FRONT_END_DEFAULTS says why not."""
    flags = train.ModelArguments()
    command = FRONT_END_DEFAULTS["qmiss-train"]
    read = {"r": flags.miss_r, "quant_type": flags.quant_type, "double_quant": flags.double_quant,
            "dropout": flags.miss_dropout, "chunked_loss": flags.chunked_loss,
            "loss_chunk_bytes": None if flags.loss_chunk_mib is None else flags.loss_chunk_mib * 2**20,
            "offload_activations": flags.offload_activations,
            "embeddings_on_host": flags.embeddings_on_host}
    for name, value in read.items():
        assert value == command.get(name, getattr(DEFAULTS, name)), name
    assert command["chunked_loss"] is not DEFAULTS.chunked_loss  # the one difference, stated once


def test_the_planner_reads_the_same_settings() -> None:
    config = tiny_llama_config()
    plain = plan_memory(config)
    planner = FRONT_END_DEFAULTS["plan_memory"]
    assert plain.settings["checkpointing"] is planner["gradient_checkpointing"]
    assert plain.settings["compute_dtype"] == str(planner["compute_dtype"]).removeprefix("torch.")
    assert plain.settings["r"] == DEFAULTS.r and plain.settings["chunked_loss"] is DEFAULTS.chunked_loss
    settings = QMissConfig(r=16, mode="bat", compute_dtype=torch.bfloat16, gradient_checkpointing=True)
    assert plan_memory(config, settings=settings).items == plan_memory(config, r=16, mode="bat").items
    with pytest.raises(TypeError):  # the second argument was bits once: refused, not misread
        plan_memory(config, None)
    with pytest.raises(TypeError, match="pass a qmiss.QMissConfig"):
        plan_memory(config, settings={"r": 16})
    parser_defaults = {a.dest: a.default for a in cli.plan_parser()._actions}
    assert parser_defaults["r"] == DEFAULTS.r and parser_defaults["mode"] == DEFAULTS.mode
    assert parser_defaults["loss_chunk_mib"] is DEFAULTS.loss_chunk_bytes is None  # chunks sized from the head


def test_every_setting_has_a_default_and_an_explanation() -> None:
    source = inspect.getsource(QMissConfig)
    for field in dataclasses.fields(QMissConfig):
        assert field.default is not dataclasses.MISSING, field.name
        line = next(line for line in source.splitlines() if line.startswith(f"    {field.name}:"))
        assert "#" in line, f"{field.name} has no comment saying what it means"


@pytest.mark.parametrize("n_in, n_out, r, mode, mini_r, problem", [
    (64, 64, 64, "default", None, None), (32, 64, 64, "default", None, "r"), (64, 64, 0, "default", None, "r"),
    (96, 64, 64, "bat", None, "bat"), (64, 96, 32, "bat", None, None), (64, 100, 16, "mini", 16, "mini"),
    (64, 96, 16, "mini", 16, None), (64, 96, 32, "bat_row", None, None), (64, 96, 64, "bat_row", None, "bat"),
    (96, 64, 32, "bat_row", None, None)])
def test_the_shape_rule_is_the_layers(n_in, n_out, r, mode, mini_r, problem) -> None:
    assert shape_problem(n_in, n_out, r, mode, mini_r) == problem
    if problem is None:
        base = torch.nn.Linear(n_in, n_out)
        layer = qmiss.MissLinear(base, r=r, mode=mode, mini_r=mini_r)
        assert tuple(layer.miss_block.shape) == adapter_shape(n_in, n_out, r, mode, mini_r)


def test_the_second_argument_is_a_config_and_nothing_else() -> None:
    with pytest.raises(TypeError, match=r"the second argument is a qmiss.QMissConfig .* prepare_qmiss\(model, r=64"):
        qmiss.prepare_qmiss(tiny_llama(), 64)


def test_peft_miss_config_is_read_as_its_adapter_folder_would_be() -> None:
    peft = pytest.importorskip("peft")
    model = qmiss.prepare_qmiss(tiny_llama(), peft.MissConfig(r=16, init_weights="bat", target_modules=["q_proj"]))
    config = model.qmiss_config
    assert (config.r, config.mode, config.bits, config.target_modules) == (16, "bat", 4, ["q_proj"])
    assert [name.split(".")[-1] for name, _ in qmiss.miss_layers(model)] == ["q_proj", "q_proj"]
