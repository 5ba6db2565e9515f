"""qmiss's experts implementation: transformers' mixture-of-experts blocks on MissExperts projections.

transformers 5 decorates each fused ``…Experts`` module with ``use_experts_implementation``, which
gives it its layout flags (``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``),
its gate (``_apply_gate``: SwiGLU halves, or gpt-oss's clamped interleaved gate) and a forward that
dispatches on ``config._experts_implementation`` through ``ALL_EXPERTS_FUNCTIONS``. qmiss registers
one more implementation there, ``"qmiss"``, and :func:`qmiss.prepare_qmiss` switches a model with
adapted experts to it; the per-architecture forward code is never touched.

It follows transformers' ``grouped_mm`` implementation step for step — tokens sorted by expert,
per-expert counts, bias gathered per row, gate, routing weights applied, order restored, summed per
token — with each projection a :class:`~qmiss.layer.MissExperts`, which computes one expert at a
time without keeping dequantized weights. An experts module that is not adapted (excluded by the
user) runs transformers' ``grouped_mm`` path unchanged.

Architectures whose experts module is not decorated (DBRX, JetMoE, Llama 4 in transformers 5.25)
cannot be served this way; their expert weights stay as they are, and ``prepare_qmiss`` names them
in a warning with their share of the weights.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

from qmiss.layer import MissExperts

#: the name qmiss's implementation is registered under (``config._experts_implementation``).
IMPLEMENTATION = "qmiss"
#: the fused expert parameters transformers' experts implementations read, gated and not.
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module that dispatches through ``ALL_EXPERTS_FUNCTIONS``
    (the flags ``use_experts_implementation`` sets, and fused expert weights)."""
    return (hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "num_experts")
            and hasattr(module, "down_proj"))


def expert_params(module: nn.Module) -> list[str]:
    """The fused projections of an experts module, in call order: ``gate_up_proj`` (or ``up_proj``), ``down_proj``."""
    return ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"qmiss"`` experts implementation (transformers calls it as the module's forward).

    Args:
        hidden_states: (tokens, hidden).
        top_k_index: (tokens, k) the experts each token is routed to.
        top_k_weights: (tokens, k) the router's weights for them.

    Returns:
        (tokens, hidden): Σ_k weight_k · expert_k(token), in ``hidden_states``' dtype.
    """
    up_name, _ = expert_params(self)
    up, down = getattr(self, up_name), self.down_proj
    if not isinstance(up, MissExperts) and not isinstance(down, MissExperts):  # not adapted: transformers' own path
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    num_top_k = top_k_index.shape[-1]
    num_tokens, hidden_dim = hidden_states.shape
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states[perm // num_top_k]  # (S, hidden), grouped by expert
    weights = top_k_weights.reshape(-1)[perm]
    counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()  # Python ints: one loop per expert
    if len(counts) > self.num_experts:
        raise ValueError(f"{down.name}: routed to expert {len(counts) - 1}, but the block has {self.num_experts}")

    h = _project(self, up, x, counts)
    if self.has_bias:
        h = h + getattr(self, f"{up_name}_bias")[expert_ids].to(h.dtype)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    out = _project(self, down, h, counts)
    if self.has_bias:
        out = out + self.down_proj_bias[expert_ids].to(out.dtype)
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    out = out * weights.unsqueeze(-1).to(out.dtype)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return out[inverse].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _project(self: nn.Module, projection: nn.Module | torch.Tensor, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """One projection of tokens sorted by expert: a MissExperts, or a fused parameter the user left out of the
    targets (multiplied expert by expert, in its own dtype)."""
    if isinstance(projection, MissExperts):
        return projection(x, counts)
    outputs = []
    for e, part in enumerate(x.split(counts)):
        weight = projection[e] if self.is_transposed else projection[e].t()  # (in, out)
        outputs.append(part.to(weight.dtype) @ weight)
    return torch.cat(outputs)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward)
