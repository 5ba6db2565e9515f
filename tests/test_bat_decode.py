"""bat's few-token path (generation, evaluation): y_i = v_i W_iᵀ + (Σ_j x_j) B_iᵀ, no W' built."""

from __future__ import annotations

import pytest
import torch

import qmiss
from qmiss import MissLinear, ops, quant
from tests.helpers import make_base, randomize, randomize_adapters, ref_bat_delta, tiny_llama, tiny_moe

QUANTS = {"nf4": (4, "nf4"), "fp4": (4, "fp4"), "int8": (8, "nf4")}
# (in, out, r, chunk in row-blocks): 10 row-blocks in chunks of 3 (not dividing), odd sizes with r=8, one chunk
SHAPES = {"128x160-r16-chunk3": (128, 160, 16, 3), "24x40-r8-chunk2": (24, 40, 8, 2),
          "64x48-r16-whole": (64, 48, 16, None)}
TOKENS = {"1": lambda r: (1,), "2x1": lambda r: (2, 1), "1x(r-1)": lambda r: (1, r - 1)}  # leading dims of x


class Spy:
    """Counts calls of ops.bat_linear_few_tokens, then runs it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls, self.tokens = 0, []
        real = ops.bat_linear_few_tokens

        def spy(x, *args):
            self.calls += 1
            self.tokens.append(x.numel() // x.shape[-1])
            return real(x, *args)

        monkeypatch.setattr(ops, "bat_linear_few_tokens", spy)


def make_layer(quant_name: str, shape: str, bias: bool = True) -> MissLinear:
    bits, qtype = QUANTS[quant_name]
    n_in, n_out, r, blocks = SHAPES[shape]
    budget = 2 * n_in * 4 * r * blocks if blocks else 2**30  # W_c and W'_c of `blocks` row-blocks in fp32
    layer = MissLinear(make_base(bits, n_in, n_out, bias=bias, quant_type=qtype), r=r, mode="bat",
                       bat_chunk_bytes=budget)
    randomize(layer, 0.1)
    return layer


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_name", QUANTS)
def test_few_tokens_equals_the_built_weight(quant_name: str, shape: str, bias: bool, tokens: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Within 1e-6 (fp32, relative to the largest output) of BatLinear, and of an fp64 W' built in full."""
    layer = make_layer(quant_name, shape, bias)
    x = torch.randn(*TOKENS[tokens](layer.r), layer.in_features, generator=torch.Generator().manual_seed(2))
    spy = Spy(monkeypatch)
    with torch.no_grad():
        got = layer(x)
        monkeypatch.setattr(ops, "few_tokens_cheaper", lambda n, r: False)
        built = layer(x)
    assert spy.calls == 1 and got.shape == built.shape == (*x.shape[:-1], layer.out_features)
    assert (got - built).abs().max() <= 1e-6 * built.abs().max()
    weight = quant.dequantize(layer.base_layer).double()
    block = layer.miss_block.detach().double()
    ref = x.double() @ (weight + ref_bat_delta(weight, block)).t()
    ref = ref + layer.bias.double() if bias else ref
    assert (got.double() - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_chosen_only_without_grad_and_below_r(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training (a gradient recorded) and r tokens or more build W'; fewer tokens without grad do not."""
    layer = make_layer("nf4", "128x160-r16-chunk3")  # r = 16
    spy = Spy(monkeypatch)
    few, many = torch.randn(1, 15, 128), torch.randn(1, 16, 128)
    y = layer(few)  # training: the adapter requires grad
    y.sum().backward()
    assert spy.calls == 0 and layer.miss_block.grad is not None
    with torch.no_grad():
        layer(many)
        assert spy.calls == 0
        layer(few)
    assert spy.tokens == [15]
    with torch.inference_mode():
        layer(few[:, :1])
    assert spy.tokens == [15, 1]
    layer.miss_block.requires_grad_(False)  # no gradient recorded although grad mode is on
    layer(few)
    assert spy.tokens == [15, 1, 15]


def test_bf16_error_is_that_of_the_built_weight() -> None:
    """In bf16 the few-token path rounds x_j (I + B_i)ᵀ where BatLinear rounds W': errors alike against fp64."""
    n, r = 512, 32
    base = make_base(4, n, n, bias=False)
    layer = MissLinear(base, r=r, mode="bat", compute_dtype=torch.bfloat16)
    block = randomize(layer, 0.05).double()
    weight = quant.dequantize(base).double()
    x = torch.randn(4, n, dtype=torch.bfloat16)
    ref = x.double() @ (weight + ref_bat_delta(weight, block)).t()
    with torch.no_grad():
        few = layer(x)
    built = layer(x).detach()  # grad on: BatLinear
    assert few.dtype == built.dtype == torch.bfloat16
    err = {name: ((y.double() - ref).norm() / ref.norm()).item() for name, y in (("few", few), ("built", built))}
    assert err["few"] <= 1.5 * err["built"] + 1e-4, err


def test_experts_decode_through_the_few_token_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """MissExperts runs each expert's tokens through ops.bat_linear: a few routed tokens take the cheap path too."""
    model = qmiss.prepare_qmiss(tiny_moe("mixtral"), r=16, bits=4, mode="bat").eval()
    randomize_adapters(model)
    ids = torch.randint(0, 128, (1, 3), generator=torch.Generator().manual_seed(0))
    spy = Spy(monkeypatch)
    with torch.no_grad():
        got = model(ids).logits
        calls = spy.calls
        monkeypatch.setattr(ops, "few_tokens_cheaper", lambda n, r: False)
        built = model(ids).logits
    assert calls > 0 and spy.calls == calls
    assert (got - built).abs().max() <= 1e-5 * built.abs().max()


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_generate_uses_the_few_token_path(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy generation: the prompt (24 tokens ≥ r) builds W', each step after it (2 tokens) does not; the tokens
    are those of BatLinear alone, and not the base model's (the adapter matters)."""
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=bits, mode="bat").eval()
    randomize_adapters(model)
    with torch.no_grad():
        for _, layer in qmiss.miss_layers(model):
            layer.miss_block.mul_(10)  # 0.2: enough to change greedy tokens of a random tiny model
    prompt = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    generate = lambda: model.generate(prompt, max_new_tokens=6, do_sample=False)  # noqa: E731
    spy = Spy(monkeypatch)
    fast = generate()
    layers = len(list(qmiss.miss_layers(model)))
    assert spy.calls == 5 * layers and set(spy.tokens) == {2}  # 6 new tokens: 1 from the prompt's pass, 5 steps
    monkeypatch.setattr(ops, "few_tokens_cheaper", lambda n, r: False)
    built = generate()
    assert spy.calls == 5 * layers
    assert torch.equal(fast, built)
    with model.disable_adapter():
        assert not torch.equal(generate()[:, 12:], fast[:, 12:])
