"""The chunked linear cross-entropy against transformers' loss, on its own and inside a model; the
activation offload and the host-kept embedding table; Trainer with the chunked loss (TRL's SFTTrainer: test_train.py)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import qmiss
from qmiss.inputs import InputError
from qmiss.loss import (ROW_MULTIPLE, auto_chunk_tokens, chunk_bytes_per_token, chunk_tokens, chunked_cross_entropy,
                        logit_transform)
from qmiss.memory import measure_peak
from qmiss.offload import attach_offload
from tests.helpers import tiny_llama

LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4  # the bounds, fp32


def reference_loss(hidden, weight, bias, labels, scale=1.0, softcap=None, **kwargs):
    """transformers' own path: the full logits, then ForCausalLMLoss."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = nn.functional.linear(hidden, weight, bias) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return ForCausalLMLoss(logits, labels, weight.shape[0], **kwargs)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def inputs(batch=3, seq=29, hidden=24, vocab=97, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=gen).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).requires_grad_()
    b = (torch.randn(vocab, generator=gen) * 0.1).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    return h, w, b, labels


CASES = {
    "all-tokens": {},
    "ignored-prompt": {"ignore": "prompt"},
    "padding": {"ignore": "padding"},
    "num-items": {"ignore": "prompt", "num_items_in_batch": 41},
    "logit-scale": {"scale": 0.25},
    "softcap": {"softcap": 3.0, "scale": 2.0},
}


@pytest.mark.parametrize("budget_tokens", [1, 7, 64, 10_000], ids=lambda n: f"{n}-token-chunks")
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_transformers(case: str, budget_tokens: int) -> None:
    """3×29 = 87 tokens: chunks of 7 leave a last chunk of 3, chunks of 64 one of 23."""
    spec = CASES[case]
    h, w, b, labels = inputs()
    if spec.get("ignore") == "prompt":
        labels[:, :11] = -100
    elif spec.get("ignore") == "padding":  # right padding of different lengths, labelled -100 as collators do
        labels[0, -9:] = -100
        labels[2, -20:] = -100
    kwargs = {"num_items_in_batch": torch.tensor(spec["num_items_in_batch"])} if "num_items_in_batch" in spec else {}
    scale, softcap = spec.get("scale", 1.0), spec.get("softcap")
    expected = reference_loss(h, w, b, labels, scale, softcap, **kwargs)
    grads = torch.autograd.grad(expected, (h, w, b))
    per_token = 97 * (4 + (4 if softcap else 0))  # fp32: one (tokens × vocab) buffer, plus tanh with softcap
    assert chunk_tokens(97, budget_tokens * per_token, 4, softcap is not None) == budget_tokens
    loss = chunked_cross_entropy(h, w, labels, b, logit_scale=scale, softcap=softcap,
                                 chunk_bytes=budget_tokens * per_token, **kwargs)
    assert abs(float(loss) / float(expected) - 1) <= LOSS_RTOL
    for got, want in zip(torch.autograd.grad(loss, (h, w, b)), grads):
        assert rel(got, want) <= GRAD_RTOL


def test_gradient_accumulation_with_num_items_in_batch_equals_one_big_batch() -> None:
    """Trainer's accumulation: each micro-batch's sum over num_items_in_batch (the valid tokens of all of them)."""
    h, w, b, labels = inputs(batch=4)
    labels[:, :5] = -100
    labels[3, -12:] = -100
    full = reference_loss(h, w, b, labels)
    want = torch.autograd.grad(full, (h, w))
    n_items = (labels[:, 1:] != -100).sum()
    total = sum(chunked_cross_entropy(h[i:i + 2], w, labels[i:i + 2], b, num_items_in_batch=n_items,
                                      chunk_bytes=10 * 97 * 4) for i in (0, 2))
    assert abs(float(total) / float(full) - 1) <= LOSS_RTOL
    for got, ref in zip(torch.autograd.grad(total, (h, w)), want):
        assert rel(got, ref) <= GRAD_RTOL


def test_shift_labels_are_taken_as_given() -> None:
    h, w, b, labels = inputs()
    shifted = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    want = chunked_cross_entropy(h, w, labels, b)
    assert torch.equal(want, chunked_cross_entropy(h, w, bias=b, shift_labels=shifted))
    # both given (transformers' context parallelism): shift_labels wins, as in ForCausalLMLoss
    assert torch.equal(want, chunked_cross_entropy(h, w, labels.flip(1), b, shift_labels=shifted))
    with pytest.raises(ValueError, match="give labels"):
        chunked_cross_entropy(h, w, bias=b)


def test_no_valid_token_gives_transformers_nan_loss_and_zero_gradients() -> None:
    h, w, b, labels = inputs()
    labels[:] = -100
    assert torch.isnan(reference_loss(h, w, b, labels))
    loss = chunked_cross_entropy(h, w, labels, b)
    assert torch.isnan(loss)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(loss, (h, w, b)))


def test_fp16_gradients_survive_gradscalers_loss_scale() -> None:
    """fp16 with GradScaler's 65,536: the 1/N and the scale are applied together in fp32, so the stored fp16
    gradient neither overflows (inf · dh) nor underflows (softmax / N); as accurate as transformers' fp16 path."""
    h, w, _, labels = inputs(batch=4, seq=1024, hidden=32, vocab=2048)
    exact = torch.autograd.grad(reference_loss(h.double(), w.double(), None, labels), h)[0]
    errors = {}
    for name, fn in (("chunked", lambda a, b: chunked_cross_entropy(a, b, labels)),
                     ("transformers", lambda a, b: reference_loss(a, b, None, labels))):
        h16 = h.detach().half().requires_grad_()
        (fn(h16, w.detach().half()) * 65536.0).backward()
        assert h16.grad.isfinite().all()
        errors[name] = rel(h16.grad.double() / 65536.0, exact)
    assert errors["chunked"] <= 2 * errors["transformers"] + 1e-3, errors


def test_torch_compile_traces_it_as_one_graph() -> None:
    """No data-dependent shapes (ignored rows are masked, not removed), no .item(): fullgraph=True holds."""
    h, w, b, labels = inputs()
    labels[:, :5] = -100
    compiled = torch.compile(lambda *a: chunked_cross_entropy(*a, chunk_bytes=10 * 97 * 4), backend="aot_eager",
                             fullgraph=True)
    got = compiled(h, w, labels, b)
    want = chunked_cross_entropy(h, w, labels, b, chunk_bytes=10 * 97 * 4)
    assert torch.equal(got, want)
    assert all(torch.equal(g, r) for g, r in zip(torch.autograd.grad(got, (h, w, b)), torch.autograd.grad(want, (h, w, b))))


def test_the_logits_never_exist() -> None:
    """Live peak of loss + backward at 512 tokens × 8,192 vocabulary: the plain loss holds several fp32
    (tokens × vocab) tensors, 16 MiB each; the chunked one a 1 MiB chunk (128 tokens)."""
    h, w, _, labels = inputs(batch=1, seq=512, hidden=64, vocab=8192)
    w.requires_grad_(False)  # a frozen head, as in a qmiss model
    logits_bytes = 512 * 8192 * 4
    plain = measure_peak(lambda: reference_loss(h, w, None, labels).backward(), exclude=[h, w])
    chunked = measure_peak(lambda: chunked_cross_entropy(h, w, labels, chunk_bytes=2**20).backward(),
                           exclude=[h, w])
    assert plain.peak_bytes >= 2 * logits_bytes
    assert chunked.peak_bytes <= 2**20 + 3 * h.numel() * 4  # one chunk; the hidden gradient and its scaled copy


HEADS = {"llama3-8b-bf16": (128256, 4096, 2, False), "llama2-7b-bf16": (32000, 4096, 2, False),
         "smollm2-fp32": (49152, 576, 4, False), "gemma2-9b-softcap-bf16": (256000, 3584, 2, True)}


@pytest.mark.parametrize("head", list(HEADS))
def test_the_automatic_chunk_is_as_large_as_the_head_in_rows_of_64(head: str) -> None:
    vocab, hidden, itemsize, softcap = HEADS[head]
    per_token, head_bytes = chunk_bytes_per_token(vocab, itemsize, softcap), vocab * hidden * itemsize
    rows = auto_chunk_tokens(vocab, hidden, itemsize, softcap)
    assert rows % ROW_MULTIPLE == 0 and rows * per_token <= head_bytes < (rows + ROW_MULTIPLE) * per_token
    # a fixed 64 MiB budget gives fewer rows the larger the vocabulary (87 at 128k in bf16); this rule does not
    assert rows > chunk_tokens(vocab, 64 * 2**20, itemsize, softcap)
    # free memory bounds it: a quarter of what is free, still whole multiples of 64, never below one multiple
    free = 8 * rows * per_token // 2
    bounded = auto_chunk_tokens(vocab, hidden, itemsize, softcap, free_bytes=free)
    assert bounded % ROW_MULTIPLE == 0 and bounded * per_token <= free // 4 < (bounded + ROW_MULTIPLE) * per_token
    assert auto_chunk_tokens(vocab, hidden, itemsize, softcap, free_bytes=0) == ROW_MULTIPLE


def test_without_a_budget_the_loss_holds_one_head_sized_chunk() -> None:
    """1,024 tokens through a 4,096 × 256 fp32 head (4 MiB): chunks of 256 rows, each 4 MiB of logits and
    gradient; the old 64 MiB default held all 1,024 rows (16 MiB) at once."""
    h, w, _, labels = inputs(batch=1, seq=1024, hidden=256, vocab=4096)
    w.requires_grad_(False)
    rows = auto_chunk_tokens(4096, 256, 4)
    chunk = rows * chunk_bytes_per_token(4096, 4)
    assert rows < 1024
    report = measure_peak(lambda: chunked_cross_entropy(h, w, labels).backward(), exclude=[h, w])
    assert chunk <= report.peak_bytes <= chunk + 3 * h.numel() * 4  # one chunk; the hidden gradient and its copy


# --- inside a model -----------------------------------------------------------------------------------------


def set_adapters(model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, layer in qmiss.miss_layers(model):
        with torch.no_grad():
            layer.miss_block.copy_(torch.randn(layer.miss_block.shape, generator=gen) * 0.02)


def pair(base, **kwargs):
    """The same prepared model twice, plain loss and chunked loss, with the same non-zero adapters."""
    models = []
    for chunked in (False, True):
        model = qmiss.prepare_qmiss(copy.deepcopy(base), r=16, chunked_loss=chunked,
                                    loss_chunk_bytes=13 * base.config.vocab_size * 4, **kwargs).train()
        set_adapters(model)
        models.append(model)
    return models


def batch(vocab: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 21), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def adapter_grads(model) -> list[torch.Tensor]:
    return [layer.miss_block.grad for _, layer in qmiss.miss_layers(model)]


@pytest.mark.parametrize("bits", [4, 8])
def test_a_prepared_model_trains_on_the_chunked_loss(bits: int) -> None:
    plain, chunked = pair(tiny_llama(vocab_size=300), bits=bits, gradient_checkpointing=True)
    inputs_ = batch(300)
    want = plain(**inputs_, num_items_in_batch=torch.tensor(25))
    got = chunked(**inputs_, num_items_in_batch=torch.tensor(25))
    assert got.logits is None and want.logits.shape == (2, 21, 300)
    assert abs(float(got.loss) / float(want.loss) - 1) <= LOSS_RTOL
    want.loss.backward()
    got.loss.backward()
    for g, w in zip(adapter_grads(chunked), adapter_grads(plain)):
        assert rel(g, w) <= GRAD_RTOL

    # evaluation, calls without labels and generation are the model's own
    chunked.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(chunked(**inputs_).logits, plain(**inputs_).logits)
        assert torch.equal(chunked(**inputs_).loss, plain(**inputs_).loss)
        prompt = inputs_["input_ids"][:1, :5]
        assert torch.equal(chunked.generate(prompt, max_new_tokens=4, do_sample=False),
                           plain.generate(prompt, max_new_tokens=4, do_sample=False))
    chunked.train()
    ids = inputs_["input_ids"]
    assert chunked(input_ids=ids).logits.shape == (2, 21, 300)  # training, but no labels: logits as usual
    as_tuple = chunked(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].dim() == 0


def test_the_bf16_flow_keeps_the_head_in_bf16_and_the_loss_in_fp32() -> None:
    """A bf16 model with QLoRA's fp32 norms: the chunked loss leaves the head in bf16 (plain upcasts it)."""
    base = tiny_llama(vocab_size=300).to(torch.bfloat16)
    kwargs = dict(bits=4, compute_dtype=torch.bfloat16, fp32_norms=True)
    plain, chunked = pair(base, **kwargs)
    assert plain.lm_head.weight.dtype == torch.float32 and chunked.lm_head.weight.dtype == torch.bfloat16
    inputs_ = batch(300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain(**inputs_).loss
        got = chunked(**inputs_).loss
    assert got.dtype == torch.float32
    assert abs(float(got) / float(want) - 1) <= 2e-2  # bf16 matmuls on a bf16 vs fp32-rounded head
    want.backward()
    got.backward()
    for g, w in zip(adapter_grads(chunked), adapter_grads(plain)):
        assert g.dtype == torch.float32 and rel(g, w) <= 0.1


def test_autocast_inside_forward_reaches_the_loss(monkeypatch) -> None:
    """accelerate puts autocast inside ``model.forward``; the loss hook runs after it, yet its matmuls run in
    the autocast dtype the head saw, as transformers' head under the same autocast would."""
    from qmiss.loss import LinearCrossEntropy

    model = qmiss.prepare_qmiss(tiny_llama(vocab_size=300), r=16, bits=4, chunked_loss=True).train()
    forward = model.forward
    model.forward = lambda *a, **k: torch.autocast("cpu", dtype=torch.bfloat16)(forward)(*a, **k)
    seen = []
    apply = LinearCrossEntropy.apply
    monkeypatch.setattr(LinearCrossEntropy, "apply", lambda *a: seen.append(a[1].dtype) or apply(*a))
    ids = batch(300)["input_ids"]
    assert model(input_ids=ids, labels=ids).loss.dtype == torch.float32
    assert seen == [torch.bfloat16] and model.lm_head.weight.dtype == torch.float32


def test_an_fp32_head_is_cast_to_a_16bit_compute_dtype() -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, compute_dtype=torch.bfloat16, chunked_loss=True)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the lookup keeps the loaded dtype


def _tiny(kind: str):
    import transformers

    small = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=64, eos_token_id=1, pad_token_id=0,
                 bos_token_id=2)
    config = {"gemma2": lambda: transformers.Gemma2Config(**small, final_logit_softcapping=5.0),
              "cohere": lambda: transformers.CohereConfig(**small, logit_scale=0.25),
              "granite": lambda: transformers.GraniteConfig(**small, logits_scaling=4.0),
              "qwen2": lambda: transformers.Qwen2Config(**small)}[kind]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).float()


@pytest.mark.parametrize("kind,transform", [("gemma2", (1.0, 5.0)), ("cohere", (0.25, None)),
                                            ("granite", (0.25, None)), ("qwen2", (1.0, None))])
def test_softcapping_and_logit_scaling_architectures(kind: str, transform: tuple) -> None:
    base = _tiny(kind)
    assert logit_transform(base) == transform
    plain, chunked = pair(base, bits=None)
    inputs_ = batch(300)
    want, got = plain(**inputs_).loss, chunked(**inputs_).loss
    assert abs(float(got) / float(want) - 1) <= LOSS_RTOL
    want.backward()
    got.backward()
    for g, w in zip(adapter_grads(chunked), adapter_grads(plain)):
        assert rel(g, w) <= GRAD_RTOL


def test_a_forward_that_changes_the_logits_otherwise_is_refused_by_name() -> None:
    from transformers import LlamaForCausalLM

    class Doubled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            logits = out.logits * 2
            return out.__class__(logits=logits)

    model = Doubled(tiny_llama().config)
    with pytest.raises(InputError, match=r"Doubled.forward is not transformers' own \(it comes from [\w.]*test_loss\), "
                                         r"so what it does to the logits after the head is not known.*chunked_loss=False"):
        qmiss.prepare_qmiss(model, r=16, chunked_loss=True)
    assert not any(True for _ in qmiss.miss_layers(model))  # refused before any surgery


def test_a_head_that_computes_more_than_a_linear_is_refused() -> None:
    """As Dory's head (an nn.Linear subclass with a learned per-token scale)."""

    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = tiny_llama()
    model.lm_head = ScaledHead(64, 256, bias=False)
    with pytest.raises(InputError, match=r"output head is a ScaledHead, not an nn.Linear.*chunked_loss=False"):
        qmiss.prepare_qmiss(model, r=16, chunked_loss=True)


#: statements the scan finds that are not about a head's logits: Gemma 3n's audio encoder caps attention logits.
_NOT_THE_HEAD = {("gemma3n", "softcap_val")}
_LOGITS_CHANGE = re.compile(r"^\s*logits = (?:logits(?:\.float\(\))?|self\.lm_head\(hidden_states\)) ([*/]) "
                            r"\(?[\w.()]*?(\w+)\)?\s*(?:#.*)?$", re.MULTILINE)


def test_every_logit_change_in_transformers_is_read_from_the_config() -> None:
    """Each statement of transformers' modeling files that scales or caps a model's logits after its head
    reads a config field that qmiss.loss.LOGIT_FIELDS describes, the way it describes it."""
    import transformers

    from qmiss.loss import LOGIT_FIELDS, LOGIT_FIELDS_BY_MODEL

    found = []
    for path in sorted((Path(transformers.__file__).parent / "models").glob("*/modeling_*.py")):
        model_type, source = path.parent.name, path.read_text()
        if "ForCausalLM(" not in source and "ForConditionalGeneration(" not in source:
            continue  # no language-model head
        rules = {**LOGIT_FIELDS, **LOGIT_FIELDS_BY_MODEL.get(model_type, {})}
        for op, field in _LOGITS_CHANGE.findall(source):
            if (model_type, field) in _NOT_THE_HEAD:
                continue
            found.append(model_type)
            use = rules.get(field)
            assert use is not None, f"{path.name}: logits {op} {field} is not in qmiss.loss.LOGIT_FIELDS"
            assert use == "softcap" or use == {"*": "multiply", "/": "divide"}[op], (path.name, op, field, use)
    assert {"gemma2", "cohere", "granite", "falcon_h1", "hyperclovax"} <= set(found)  # the scan sees them


def test_bad_chunked_loss_settings_are_refused_before_surgery() -> None:
    model = tiny_llama()
    with pytest.raises(InputError, match=r"the output head lm_head is in target_modules.*exclude it"):
        qmiss.prepare_qmiss(model, r=16, target_modules=["q_proj", "lm_head"], chunked_loss=True)
    with pytest.raises(InputError, match="loss_chunk_bytes=0 must be a positive number of bytes"):
        qmiss.prepare_qmiss(model, r=16, chunked_loss=True, loss_chunk_bytes=0)
    with pytest.raises(InputError, match="ties its input embeddings to its output head"):
        qmiss.prepare_qmiss(tiny_llama(tie_word_embeddings=True), r=16, embeddings_on_host=True)
    assert not any(True for _ in qmiss.miss_layers(model))


# --- offload and host embeddings ------------------------------------------------------------------------------


def test_offloaded_activations_round_trip_to_the_same_gradients() -> None:
    """On the CPU the offload is a no-op; forced to copy host tensors too, it packs the checkpointed layer
    inputs (and more) and backward unpacks them to the same gradients."""
    base = tiny_llama(vocab_size=300, num_hidden_layers=3)
    plain = qmiss.prepare_qmiss(copy.deepcopy(base), r=16, bits=4, gradient_checkpointing=True).train()
    offloaded = qmiss.prepare_qmiss(copy.deepcopy(base), r=16, bits=4, gradient_checkpointing=True,
                                    offload_activations=True, chunked_loss=True).train()
    for model in (plain, offloaded):
        set_adapters(model)
    inputs_ = batch(300)
    offloaded(**inputs_).loss.backward()
    assert offloaded.qmiss_offload.offload.offloaded_bytes == 0  # CPU tensors stay where they are
    for model in (plain, offloaded):
        model.zero_grad(set_to_none=True)

    hooks = attach_offload(offloaded, min_bytes=0, include_host=True)
    plain(**inputs_).loss.backward()
    offloaded(**inputs_).loss.backward()
    layer_inputs = 3 * 2 * 21 * 64 * 4  # 3 layers × (2 × 21 tokens × 64 hidden) fp32
    assert hooks.offload.offloaded_bytes >= layer_inputs
    for g, w in zip(adapter_grads(offloaded), adapter_grads(plain)):
        assert rel(g, w) <= 1e-5


def test_an_offloaded_copy_is_never_handed_to_another_tensor_at_the_same_address() -> None:
    """A freed block soon holds another tensor of the same shape; its packed copy must be its own."""
    import numpy as np

    from qmiss.offload import ActivationOffload

    offload = ActivationOffload(min_bytes=0, include_host=True)
    buffer = np.ones(1024, dtype=np.float32)
    first = torch.from_numpy(buffer)
    packed_first = offload.pack(first)
    del first
    buffer[:] = 2.0
    second = torch.from_numpy(buffer)  # the same address, a new tensor
    assert torch.equal(offload.unpack(offload.pack(second)), torch.full((1024,), 2.0))
    assert torch.equal(offload.unpack(packed_first), torch.ones(1024))
    shared = torch.randn(1024)  # the same tensor saved by two layers is copied once
    offload.pack(shared)
    before = offload.offloaded_bytes
    offload.pack(shared)
    assert offload.offloaded_bytes == before


def test_embeddings_on_host_give_the_same_step_and_stay_on_the_host() -> None:
    plain, hosted = (qmiss.prepare_qmiss(tiny_llama(vocab_size=300), r=16, bits=4, chunked_loss=True,
                                         embeddings_on_host=flag).train() for flag in (False, True))
    for model in (plain, hosted):
        set_adapters(model)
    inputs_ = batch(300)
    want, got = plain(**inputs_).loss, hosted(**inputs_).loss
    assert torch.equal(want, got)
    want.backward()
    got.backward()
    assert all(torch.equal(g, w) for g, w in zip(adapter_grads(hosted), adapter_grads(plain)))
    assert hosted.device == hosted.lm_head.weight.device  # model.device: a decoder weight's, not the host table's
    assert "model.embed_tokens.weight" in hosted._ddp_params_and_buffers_to_ignore
    assert set(hosted.state_dict()) == set(plain.state_dict())
    hosted.to(torch.bfloat16)  # a cast applies; a move would not
    assert hosted.model.embed_tokens.weight.dtype == torch.bfloat16
    assert hosted.model.embed_tokens.weight.device.type == "cpu"


@pytest.mark.gpu
def test_long_context_settings_on_a_gpu_in_bf16() -> None:
    """On CUDA: the table stays on the host after .cuda(), activations go to pinned memory, the loss matches."""
    base = tiny_llama(vocab_size=4096, hidden_size=256, intermediate_size=512,
                      max_position_embeddings=4096).to(torch.bfloat16)
    plain = qmiss.prepare_qmiss(copy.deepcopy(base).cuda(), r=16, bits=4, gradient_checkpointing=True).train()
    fitted = qmiss.prepare_qmiss(copy.deepcopy(base), r=16, bits=4, gradient_checkpointing=True, chunked_loss=True,
                                 offload_activations=True, embeddings_on_host=True).cuda().train()
    assert fitted.model.embed_tokens.weight.device.type == "cpu" and fitted.lm_head.weight.is_cuda
    inputs_ = {k: v.cuda() for k, v in batch(4096).items()}
    inputs_["input_ids"] = inputs_["input_ids"].repeat(1, 100)[:, :2048]  # (2, 2048): 2 MiB layer inputs in bf16
    inputs_["attention_mask"] = torch.ones_like(inputs_["input_ids"])
    inputs_["labels"] = inputs_["input_ids"].clone()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, got = plain(**inputs_).loss, fitted(**inputs_).loss
    assert abs(float(got) / float(want) - 1) <= 1e-2
    assert fitted.qmiss_offload.offload.offloaded_bytes >= 2 * (2 * 2048 * 256 * 2)  # both layers' inputs
    got.backward()
    assert all(layer.miss_block.grad is not None for _, layer in qmiss.miss_layers(fitted))


# --- Trainer and TRL ------------------------------------------------------------------------------------------


def _rows(tokenizer, n: int = 8) -> list[dict]:
    from qmiss import demo, train

    data = train.DataArguments()
    return [train.encode(tokenizer, r["query"], r["response"], data) for r in demo.arithmetic_problems(n, 0)]


def test_trainer_with_the_chunked_loss_takes_the_same_steps(tmp_path, tiny_model_dir: str) -> None:
    """transformers' Trainer, gradient accumulation (num_items_in_batch): the same losses as the plain loss."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainingArguments

    from qmiss.trainer import QMissTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    losses = {}
    for chunked in (False, True):
        model = qmiss.prepare_qmiss(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=16, bits=4,
                                    chunked_loss=chunked)
        args = TrainingArguments(output_dir=str(tmp_path / str(chunked)), max_steps=3, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[], save_strategy="no",
                                 use_cpu=True, logging_steps=1, seed=0)
        trainer = QMissTrainer(model=model, args=args, train_dataset=Dataset.from_list(_rows(tokenizer)),
                               data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), processing_class=tokenizer)
        trainer.train()
        losses[chunked] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses[True]) == 3
    for got, want in zip(losses[True], losses[False]):
        assert abs(got / want - 1) <= 1e-4
