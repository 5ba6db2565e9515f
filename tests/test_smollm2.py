"""Real weights: SmolLM2-135M-Instruct (first 4 decoder layers), quantized, trains with each mode."""

from __future__ import annotations

import pytest
import torch

import qmiss

TEXT = [
    "The Industrial Revolution began in Great Britain in the late eighteenth century and spread to Europe.",
    "Photosynthesis converts light energy into chemical energy, producing oxygen as a by-product.",
    "A prime number is a natural number greater than one that has no divisors other than one and itself.",
    "The river flows north through the valley, past the old mill, and empties into the lake beyond the hills.",
]


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
@pytest.mark.parametrize("mode", ["default", "mini", "bat"])
def test_thirty_adamw_steps_lower_the_loss(smollm2_dir, mode: str, bits: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    batch = tokenizer(TEXT, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, num_hidden_layers=4, dtype=torch.float32)
    model = qmiss.prepare_qmiss(model, r=64, bits=bits, mode=mode, mini_r=64 if mode == "mini" else None,
                                gradient_checkpointing=True)
    assert len(list(qmiss.miss_layers(model))) == 4 * 7
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5, losses
