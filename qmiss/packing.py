"""Padding-free packing: rows laid end to end into sequences, none attending to another.

Rows of token ids are binned into sequences of at most ``length`` tokens by TRL's best-fit-decreasing
packer (``trl.pack_dataset(strategy="bfd")``: no row is split, a row longer than ``length`` is cut).
:class:`PackedCollator` pads a batch of such sequences to its longest one and gives every token its
position within its own row (``position_ids`` restart at 0 per row) and no attention mask, which is
how transformers recognises packed sequences (``masking_utils.find_packed_sequence_indices``): SDPA
and eager attention get a block-diagonal causal mask per sequence, FlashAttention its varlen path.
Labels never cross a boundary: the first token of every row is not predicted from the row before.

Binning into sequences of ``length`` (rather than flattening the whole batch into one row, TRL's
``padding_free``) keeps attention's cost and mask at most that of a padded batch of ``length``-token
rows, which is what SDPA and eager attention need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qmiss.encode import IGNORE


def pack(dataset, length: int):
    """``dataset`` (``input_ids``, ``labels``) packed into sequences of at most ``length`` tokens, with a
    ``seq_lengths`` column (the length of each row in each sequence)."""
    from trl import pack_dataset  # here, not at the top: importing TRL takes seconds, and only packing needs it

    return pack_dataset(dataset, seq_length=length, strategy="bfd")


@dataclass
class PackedCollator:
    """A batch of packed sequences: ``input_ids`` and ``labels`` padded on the right, ``position_ids`` restarting
    per row, no ``attention_mask``, and ``use_cache=False``.

    transformers' models start a KV cache whenever ``use_cache`` is on (the config's default, outside gradient
    checkpointing), and with a cache present they do not look for packed sequences: rows would attend to each
    other. The batch itself turns the cache off.

    Args:
        pad_token_id: the id padding is filled with (its labels are ignored).
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((len(features), width), dtype=torch.long)  # padding: rows of one token each
        for b, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[b, :n] = torch.as_tensor(feature["input_ids"])
            labels[b, :n] = torch.as_tensor(feature["labels"])
            lengths = feature.get("seq_lengths") or [n]
            position_ids[b, :n] = torch.cat([torch.arange(k) for k in lengths])
        labels[position_ids == 0] = IGNORE  # a row's first token is never predicted from the row before it
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}
