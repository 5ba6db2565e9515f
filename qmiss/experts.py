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


def experts_shape(module: nn.Module, param: str) -> tuple[int, int, int]:
    """(experts, in_features, out_features) of one fused expert parameter (``is_transposed``: stored (E, in, out))."""
    n_experts, a, b = getattr(module, param).shape
    return (n_experts, a, b) if module.is_transposed else (n_experts, b, a)


def activate(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """What an experts module applies between its two projections: its gate on ``gate_up_proj``'s output
    (SwiGLU halves, or gpt-oss's clamped interleaved gate), or its activation on ``up_proj``'s;
    (S, 2I or I) -> (S, I)."""
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


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
    h = activate(self, h)
    out = _project(self, down, h, counts)
    if self.has_bias:
        out = out + self.down_proj_bias[expert_ids].to(out.dtype)
    if getattr(self, "has_post_expert_norm", False):  # transformers 5.17's experts modules have no such flag (5.25's do)
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


# --- what experts_forward holds in a training step: the model qmiss.plan counts (checked in tests/test_plan.py) ---


def gate_bytes_per_row(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes :func:`activate` keeps for backward per routed row, its input included (SwiGLU halves: the input and
    act(gate), 3·I values; gpt-oss's clamped gate: 6·I). Read from the module's own gate (a function of its
    flags, no weights: a meta-device module will do) run on one row."""
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    width = experts_shape(module, expert_params(module)[0])[2]
    row = torch.zeros(1, width, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = activate(module, row)  # its graph keeps every saved storage alive, so no address is counted twice
    del out
    return sum(saved.values())


def saved_bytes(module: nn.Module, tokens: int, top_k: int, dtype: torch.dtype, ranks: dict[str, int],
                mode: str) -> int:
    """What :func:`experts_forward` saves for backward, for ``tokens`` routed to ``top_k`` experts each (S rows).

    Per routed row: what the gate keeps (:func:`gate_bytes_per_row`, the up projection's output included), the
    down projection's output (kept by the routing-weight product), with bat and bat_row the projections' inputs
    too (the sorted input copy and down's input: bat's dB and bat_row's turns need them; default and mini keep
    none), the routing weight, three int64 index vectors (the sort, the gather, the inverse). Per token: the
    router's fp32 probabilities over the experts and its top-k. Per adapted projection (``ranks``: parameter ->
    r): each expert's shard sums (default, mini) and each expert's adapter in ``dtype`` (a copy unless that is fp32
    and the adapter is used as it is).
    """
    e = torch.finfo(dtype).bits // 8
    params = expert_params(module)
    (n_experts, hidden, _), (_, inter, _) = (experts_shape(module, p) for p in params)
    rows = tokens * top_k
    # default/mini: the projections keep no input (BatLinear without a block needs the weight alone for dx), so
    # of the sorted copy, down's input and its output only the output stays (the routing-weight product keeps it)
    kept = 2 * hidden + inter if mode in ("bat", "bat_row") else hidden
    saved = rows * (e * kept + gate_bytes_per_row(module, dtype) + e + 3 * 8)
    saved += tokens * (4 * n_experts + 16 * top_k)
    for param, r in ranks.items():
        _, n_in, n_out = experts_shape(module, param)
        if mode in ("default", "mini"):  # bat_row's turns keep the expert inputs, already counted
            saved += rows * r * e
        if e < 4 or mode == "mini":  # (r, out) per expert, mini's tiled; bat's (out/r, r, r) is as many values,
            saved += n_experts * r * (n_in if mode == "bat_row" else n_out) * e  # bat_row's (in/r, r, r) r·in
    return saved


def backward_bytes(module: nn.Module, tokens: int, top_k: int, dtype: torch.dtype, held: dict[str, int]) -> int:
    """The most :func:`experts_forward`'s backward holds beyond what it saved, at the worst of three moments.

    Its start: the un-permuted output's gradient, scattered into a zeroed (S, hidden), then the routing-weight
    product's gradients (2 S × hidden). The down projection, where its input's gradient is gathered over the
    experts (:class:`~qmiss.layer.MissExperts` slices one expert's rows at a time): a running (S, I) sum, and
    either one expert's full-size slice gradient with the new sum (2 S × I) or, while an expert is differentiated,
    what it holds (``held``: parameter -> :func:`qmiss.layer.expert_backward_bytes`, 0 if not adapted); the output's
    gradient takes the place of the output it frees. The up projection: the same over hidden, with its output's
    gradient alive and the gate's tensors, the down input and output freed.
    """
    e = torch.finfo(dtype).bits // 8
    up, down = expert_params(module)
    (_, hidden, up_out), (_, inter, _) = experts_shape(module, up), experts_shape(module, down)
    rows = tokens * top_k
    start = 2 * rows * hidden * e
    at_down = rows * inter * e + max(2 * rows * inter * e, held.get(down, 0))
    freed = rows * (gate_bytes_per_row(module, dtype) + e * (inter + hidden))
    at_up = rows * e * (up_out + hidden) + max(2 * rows * hidden * e, held.get(up, 0)) - freed
    return max(start, at_down, at_up)
