"""DDP, FSDP2 and FSDP1 on the CPU (gloo, 2 processes): only adapters are reduced, and 2 ranks equal one process."""

from __future__ import annotations

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import qmiss
from qmiss.trainer import NonfiniteLoss
from tests.helpers import free_port, tiny_llama, train_args as args

STEPS, GLOBAL_BATCH, SEQ = 3, 4, 16


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 256, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))


def _model():
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, mode="bat")
    model.train()
    return model


def _train(model, optimizer, rows: slice) -> None:
    for step in range(STEPS):
        ids = _batch(step)[rows]
        model(input_ids=ids, labels=ids).loss.backward()  # equal lengths, no padding: every rank's mean is exact
        optimizer.step()
        optimizer.zero_grad()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = _model()
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ddp = DistributedDataParallel(model, init_sync=False)  # identical start; nothing frozen is broadcast
    reduced, _ = ddp._build_params_for_reducer()  # what the reducer all-reduces: the adapters, nothing frozen
    assert {id(p) for p in reduced} == {id(layer.miss_block) for _, layer in qmiss.miss_layers(model)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    per_rank = GLOBAL_BATCH // world
    _train(ddp, optimizer, slice(rank * per_rank, (rank + 1) * per_rank))
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if not p.requires_grad)
    torch.save(qmiss.adapter_state_dict(model), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank leaves while another still talks to it
    os._exit(0)  # skip C++ static destructors, as in _fsdp_worker


def test_ddp_two_ranks_match_one_process_with_the_same_global_batch(tmp_path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # identical on every rank

    torch.manual_seed(0)
    single = _model()
    _train(single, torch.optim.AdamW([p for p in single.parameters() if p.requires_grad], lr=1e-2), slice(None))
    expected = qmiss.adapter_state_dict(single)
    assert any(v.abs().sum() > 0 for v in expected.values())
    for key, value in expected.items():
        # fp32: the all-reduce sums in another order; AdamW's normalisation magnifies that for tiny gradients
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5)


def _nonfinite_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Two micro-steps under DDP; rank 1's second loss is NaN, rank 0's are finite. Then one check."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    ddp = DistributedDataParallel(_model(), init_sync=False)
    watch = NonfiniteLoss()
    ids = _batch(0)[rank * 2:(rank + 1) * 2]
    for step in (1, 2):
        loss = ddp(input_ids=ids, labels=ids).loss.detach()
        watch.record(loss * float("nan") if rank == 1 and step == 2 else loss, step, {"input_ids": ids})
    try:
        watch.check(ddp)  # the diagnosing forward under DDP broadcasts buffers: both ranks must run it
        outcome = "no error"
    except FloatingPointError as error:
        outcome = str(error)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as file:
        file.write(outcome)
    dist.barrier()  # a rank left waiting in a collective alone would make this time out
    os._exit(0)


def test_a_nonfinite_loss_on_one_rank_stops_every_rank(tmp_path) -> None:
    mp.spawn(_nonfinite_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert rank1.startswith("non-finite loss (nan) at step 2; stopped"), rank1  # NaN put in after the forward
    assert rank0.startswith("non-finite loss on another rank; stopped"), rank0


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"],
    # accelerate's --cpu flag means one process (or MPI); --multi_gpu starts torchrun's processes, and
    # the Trainer's --use_cpu makes them gloo ranks on a machine without GPUs
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_qmiss_train_two_processes(tmp_path, tiny_model_dir: str, jsonl: str, launcher: str) -> None:
    """The user's path: Trainer's own DDP (gloo on the CPU) under torchrun or accelerate launch; rank 0 writes."""
    import json
    import subprocess
    import sys


    out = tmp_path / "run"
    # torchrun pads rows; accelerate packs them, 96 tokens a sequence (qmiss-train's default, packing)
    rows = ["--packing", "false"] if launcher == "torchrun" else ["--model_max_length", "96"]
    command = [sys.executable, *LAUNCHERS[launcher], str(free_port()), "-m", "qmiss.train",
               *args(tiny_model_dir, jsonl, out, "--max_steps", "3", "--per_device_train_batch_size", "2",
                     "--save_strategy", "steps", "--save_steps", "3", *rows)]
    proc = subprocess.run(command, capture_output=True, timeout=300, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["packing"] == (launcher != "torchrun")
    assert qmiss.read_adapter(out)[0].r == 16
    # (the two ranks' output interleaves on one pipe, so the trainer state is read from the checkpoint)
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    # 3 steps × 2 ranks × 2 sequences (20 rows, or the packed sequences): both ranks trained
    assert state["epoch"] == pytest.approx(3 / math.ceil(summary["sequences"] / 4))
    assert summary["sequences"] >= 12 if summary["packing"] else summary["sequences"] == 20


def _fsdp_worker(rank: int, world: int, port: int, mode: str, out_dir: str, chunked_loss: bool = False) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, mode=mode, chunked_loss=chunked_loss)
    model.train()
    for layer in model.model.layers:  # FSDP2: each decoder layer its own unit, 4-bit weights sharded as uint8
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    per_rank = GLOBAL_BATCH // world
    _train(model, optimizer, slice(rank * per_rank, (rank + 1) * per_rank))
    qmiss.save_adapter(model, out_dir)  # collective gather; rank 0 writes
    dist.barrier()  # no rank leaves while another still talks to it
    # Leave without running C++ static destructors: at interpreter exit, FSDP2 + gloo on the CPU
    # occasionally aborts ("terminate called without an active exception") after all work is done.
    os._exit(0)


def test_fsdp2_two_ranks_match_one_process(tmp_path) -> None:
    """bat trains on the chunked loss there: its hook reads the head while FSDP2 has it unsharded."""
    for mode, chunked_loss in [("default", False), ("bat", True)]:
        out = tmp_path / mode
        mp.spawn(_fsdp_worker, args=(2, free_port(), mode, str(out), chunked_loss), nprocs=2, join=True)
        saved = qmiss.read_adapter(out)[1]
        torch.manual_seed(0)
        single = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, mode=mode)
        single.train()
        _train(single, torch.optim.AdamW([p for p in single.parameters() if p.requires_grad], lr=1e-2),
               slice(None))
        for name, layer in qmiss.miss_layers(single):
            torch.testing.assert_close(saved[name], layer.miss_block.detach(), rtol=1e-4, atol=1e-5)


def _fsdp1_worker(rank: int, world: int, port: int, mode: str, storage: torch.dtype, out_dir: str) -> None:
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from qmiss.fsdp import update_fsdp_plugin
    from qmiss.layer import MissBlock

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, mode=mode, quant_storage=storage)
    model.train()
    packed = {n: layer.base_layer.weight.detach().clone() for n, layer in qmiss.miss_layers(model)}
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=False)
    update_fsdp_plugin(plugin, model)  # what QMissTrainer does to accelerate's plugin
    assert plugin.mixed_precision_policy.param_dtype == storage
    # accelerate would pass device_id=cuda:N; on the CPU, FSDP1 needs the device named
    wrapped = FSDP(model, auto_wrap_policy=plugin.auto_wrap_policy, mixed_precision=plugin.mixed_precision_policy,
                   use_orig_params=plugin.use_orig_params, device_id=torch.device("cpu"))
    units = [m for m in FSDP.fsdp_modules(wrapped) if m._handle is not None]
    # each adapter alone in a unit; every other flat parameter frozen and of the storage dtype
    assert sum(isinstance(m.module, MissBlock) for m in units) == len(packed)
    for unit in units:
        flat = unit._handle.flat_param
        assert flat.requires_grad == isinstance(unit.module, MissBlock)
        assert flat.dtype == (torch.float32 if flat.requires_grad else storage)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    per_rank = GLOBAL_BATCH // world
    _train(wrapped, optimizer, slice(rank * per_rank, (rank + 1) * per_rank))
    qmiss.save_adapter(wrapped, out_dir)  # summons the full adapters on every rank; rank 0 writes
    with FSDP.summon_full_params(wrapped, writeback=False):
        for name, layer in qmiss.miss_layers(wrapped):  # bytes compared (packed bytes read as floats hold NaNs)
            assert torch.equal(layer.base_layer.weight.view(torch.uint8), packed[name].view(torch.uint8)), name
    # transformers' Trainer under FULL_STATE_DICT gathers the state dict itself and hands it to _save
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)  # (accelerate offloads to the CPU from a GPU)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
        state = wrapped.state_dict()
    if rank == 0:
        qmiss.save_adapter(wrapped, os.path.join(out_dir, "from_state_dict"), state_dict=state)
    dist.barrier()
    os._exit(0)


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16], ids=["fp32-storage", "bf16-storage"])
def test_fsdp1_qlora_style_two_ranks_match_one_process(tmp_path, storage) -> None:
    """FSDP1 as accelerate's plugin sets it up (after qmiss.update_fsdp_plugin), quant_storage in a float dtype."""
    for mode in ["default", "bat"]:
        out = tmp_path / mode
        mp.spawn(_fsdp1_worker, args=(2, free_port(), mode, storage, str(out)), nprocs=2, join=True)
        saved = qmiss.read_adapter(out)[1]
        from_state_dict = qmiss.read_adapter(out / "from_state_dict")[1]
        assert all(torch.equal(saved[k], from_state_dict[k]) for k in saved)
        torch.manual_seed(0)
        single = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, mode=mode, quant_storage=storage)
        single.train()
        _train(single, torch.optim.AdamW([p for p in single.parameters() if p.requires_grad], lr=1e-2),
               slice(None))
        for name, layer in qmiss.miss_layers(single):
            expected = layer.miss_block.detach()
            if storage == torch.float32:
                torch.testing.assert_close(saved[name], expected, rtol=1e-4, atol=1e-5)
            else:  # FSDP computes with bf16 copies of the adapters (the mixed-precision param dtype)
                cosine = torch.nn.functional.cosine_similarity(saved[name].flatten(), expected.flatten(), dim=0)
                assert cosine > 0.99, (name, cosine)


#: what ``accelerate launch --use_fsdp --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
#: --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer`` puts in each rank's environment (accelerate 1.16's
#: launch.py), FSDP1 being its default
ACCELERATE_FSDP1_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1",
                        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                        "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer", "FSDP_USE_ORIG_PARAMS": "false",
                        "FSDP_SYNC_MODULE_STATES": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}


def _accelerate_fsdp1_worker(rank: int, world: int, port: int, model_dir: str, data: str, out_dir: str) -> None:
    """qmiss-train's model under accelerate's FSDP1 plugin: loaded by qmiss.train.load_model as the launch
    environment asks, the plugin built from that environment and set up by QMissTrainer's hook, then wrapped as
    accelerate wraps (on a GPU accelerate passes device_id=cuda:N; FSDP itself runs on gloo here)."""
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from qmiss import train
    from qmiss.fsdp import update_fsdp_plugin

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **ACCELERATE_FSDP1_ENV)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model_args, _, train_args = train.parse_args(args(model_dir, data, out_dir))
    version = train.fsdp_version(train_args)
    assert version == 1
    model = train.load_model(model_args, torch.device("cpu"), fsdp=version)
    plugin = FullyShardedDataParallelPlugin()  # reads the launch environment, as accelerate's Accelerator does
    update_fsdp_plugin(plugin, model)
    wrapped = FSDP(model, auto_wrap_policy=plugin.auto_wrap_policy, mixed_precision=plugin.mixed_precision_policy,
                   use_orig_params=plugin.use_orig_params, device_id=torch.device("cpu"))
    wrapped.train()
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(rank))
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in wrapped.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    dist.barrier()
    os._exit(0)


def test_qmiss_train_model_under_accelerates_fsdp1_plugin(tmp_path, tiny_model_dir: str, jsonl: str) -> None:
    """accelerate's FSDP1 (its default) flattens each decoder layer's frozen tensors into one tensor of one dtype:
    under it qmiss-train stores the 4-bit weights in the compute dtype (uint8 would be refused: "Must flatten
    tensors with uniform dtype")."""
    mp.spawn(_accelerate_fsdp1_worker, args=(2, free_port(), tiny_model_dir, jsonl, str(tmp_path)), nprocs=2,
             join=True)


@pytest.mark.parametrize("version", ["1", "2"])
def test_fsdp_on_the_cpu_is_refused_before_the_model_loads(monkeypatch, tmp_path, tiny_model_dir: str, jsonl: str,
                                                          version: str) -> None:
    """On the CPU accelerate's plugin refuses sync_module_states, or its ranks silently run DDP: one line first."""
    from qmiss import train

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", version)
    with pytest.raises(train.InputError, match=rf"FSDP \(version {version}\) with --use_cpu: accelerate shards only"):
        train.run(args(tiny_model_dir, jsonl, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("version", ["1", "2"])
def test_8bit_under_fsdp_is_refused(monkeypatch, tiny_model_dir: str, jsonl: str, tmp_path, version: str) -> None:
    from qmiss import train

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", version)
    model_args, _, train_args = train.parse_args(args(tiny_model_dir, jsonl, tmp_path, "--bits", "8"))
    monkeypatch.setattr(type(train_args), "device", property(lambda self: torch.device("cuda", 0)))  # as on a GPU
    with pytest.raises(train.InputError, match=rf"--bits 8 under FSDP{version}: bitsandbytes' 8-bit layers cannot"):
        train.check_fsdp(model_args, train_args)
