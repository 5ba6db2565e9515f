"""DDP and FSDP2 on the CPU (gloo, 2 processes): only adapters are reduced, and 2 ranks equal one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import qmiss
from tests.conftest import tiny_llama
from tests.test_train import jsonl, tiny_model_dir  # noqa: F401 (fixtures)

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_match_one_process_with_the_same_global_batch(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
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


def test_qmiss_train_under_torchrun_two_processes(tmp_path, tiny_model_dir: str, jsonl: str) -> None:
    """The user's path: Trainer's own DDP (gloo on the CPU) under torchrun; rank 0 writes the adapter once."""
    import json
    import subprocess
    import sys

    from tests.test_train import args

    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "qmiss.train",
               *args(tiny_model_dir, jsonl, out, "--max_steps", "3", "--per_device_train_batch_size", "2",
                     "--save_strategy", "steps", "--save_steps", "3")]
    proc = subprocess.run(command, capture_output=True, timeout=300, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert qmiss.read_adapter(out)[0].r == 16
    # (the two ranks' output interleaves on one pipe, so the trainer state is read from the checkpoint)
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(0.6)  # 3 steps × 2 ranks × 2 rows = 12 of 20 rows: both ranks trained


def _fsdp_worker(rank: int, world: int, port: int, mode: str, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, mode=mode)
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
    for mode in ["default", "bat"]:
        out = tmp_path / mode
        mp.spawn(_fsdp_worker, args=(2, _free_port(), mode, str(out)), nprocs=2, join=True)
        saved = qmiss.read_adapter(out)[1]
        torch.manual_seed(0)
        single = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, mode=mode)
        single.train()
        _train(single, torch.optim.AdamW([p for p in single.parameters() if p.requires_grad], lr=1e-2),
               slice(None))
        for name, layer in qmiss.miss_layers(single):
            torch.testing.assert_close(saved[name], layer.miss_block.detach(), rtol=1e-4, atol=1e-5)
