"""packing.py: rows packed without padding give each row exactly what it gets alone — logits, loss, gradients."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

import qmiss
from qmiss.encode import IGNORE
from qmiss.packing import PackedCollator, pack
from tests.helpers import tiny_llama

LENGTHS = [5, 17, 9, 30, 3, 12, 22, 8]  # rows of a skewed batch


def rows(vocab: int = 256) -> list[dict[str, list[int]]]:
    """Rows of LENGTHS tokens; the first third of each is a prompt (not learned)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        prompt = n // 3
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def packed_batch(length: int = 40) -> dict:
    sequences = pack(Dataset.from_list(rows()), length)
    assert all(sum(s) <= length for s in sequences["seq_lengths"]) and len(sequences) < len(LENGTHS)
    return PackedCollator(pad_token_id=0)(list(sequences))


def row_by_row(model) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The mean loss over every learned token of every row, each row run alone; and each row's logits."""
    total, count, logits = 0.0, 0, []
    for row in rows():
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        out = model(input_ids=ids, labels=labels)
        n = int((labels[:, 1:] != IGNORE).sum())
        total, count = total + out.loss * n, count + n
        logits.append(model(input_ids=ids).logits[0])
    return total / count, logits


def test_the_collator_restarts_positions_and_cuts_labels_at_boundaries() -> None:
    batch = packed_batch()
    assert "attention_mask" not in batch and batch["use_cache"] is False
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == IGNORE).all()  # no row's first token is predicted from the row before
    lengths = sorted(int(n) for seq in pack(Dataset.from_list(rows()), 40)["seq_lengths"] for n in seq)
    assert lengths == sorted(LENGTHS)  # every row once, none split


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunked_loss", [False, True], ids=["plain-loss", "chunked-loss"])
def test_a_packed_batch_equals_its_rows_run_alone(attn: str, chunked_loss: bool) -> None:
    model = qmiss.prepare_qmiss(tiny_llama(attn_implementation=attn), r=16, bits=4, chunked_loss=chunked_loss)
    assert model.config.use_cache  # a KV cache would hide the packing from transformers: the batch turns it off
    with torch.no_grad():
        for _, layer in qmiss.miss_layers(model):
            layer.miss_block.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    model.train()
    batch = packed_batch()
    packed = model(**batch).loss
    model.zero_grad()
    packed.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    alone, logits = row_by_row(model)
    alone.backward()
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)

    with torch.no_grad():  # and each row's logits, at its place in its sequence (the lengths are unique)
        model.eval()
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        placed = {}
        for b, seq in enumerate(pack(Dataset.from_list(rows()), 40)["seq_lengths"]):
            start = 0
            for n in seq:
                placed[n], start = out[b, start : start + n], start + n
        assert sorted(placed) == sorted(LENGTHS)
        for n, expected in zip(LENGTHS, logits):
            torch.testing.assert_close(placed[n], expected, rtol=0, atol=1e-5)
