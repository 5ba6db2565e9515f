"""quant.py: quantizing, dequantizing whole weights and row ranges."""

from __future__ import annotations

import os
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch

from qmiss import quant
from tests.helpers import make_base

QUANTS = [(4, "nf4", True), (4, "nf4", False), (4, "fp4", True), (8, "nf4", True)]
QIDS = ["nf4-dq", "nf4", "fp4-dq", "int8"]


@pytest.mark.parametrize("bits,qtype,dq", QUANTS, ids=QIDS)
def test_quantize_linear_kind_and_dequantized_weight(bits: int, qtype: str, dq: bool) -> None:
    base = make_base(bits, 128, 96, quant_type=qtype, double_quant=dq)
    assert quant.quant_bits(base) == bits
    assert quant.in_out_features(base) == (128, 96)
    ref = make_base(None, 128, 96).weight
    weight = quant.dequantize(base)
    assert weight.shape == (96, 128) and weight.dtype == torch.float32
    tolerance = 0.02 if bits == 8 else 0.25
    assert (weight - ref).abs().max() < tolerance * ref.abs().max()
    if bits == 4:
        assert quant.quant_type(base) == qtype
        torch.testing.assert_close(weight, bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state))


@pytest.mark.parametrize("bits,qtype,dq", QUANTS, ids=QIDS)
@pytest.mark.parametrize("n_in", [128, 96, 40], ids=["in=128", "in=96", "in=40"])
def test_row_ranges_equal_slices_of_the_whole(bits: int, qtype: str, dq: bool, n_in: int) -> None:
    base = make_base(bits, n_in, 200, quant_type=qtype, double_quant=dq)
    whole = quant.dequantize(base)
    rows = quant.row_dequantizer(base, torch.float32)
    step = min(quant.row_alignment(base) * 8, 200)
    for a in range(0, 200, step):
        b = min(a + step, 200)
        torch.testing.assert_close(rows(a, b), whole[a:b], rtol=0, atol=0)


def test_row_dequantizer_casts_to_the_requested_dtype() -> None:
    base = make_base(4, 64, 64)
    assert quant.row_dequantizer(base, torch.bfloat16)(0, 64).dtype == torch.bfloat16


def test_row_alignment_follows_blocksize() -> None:
    assert quant.row_alignment(make_base(4, 128, 8)) == 1
    assert quant.row_alignment(make_base(4, 96, 16)) == 16  # in % blocksize != 0: the whole layer at once
    assert quant.row_alignment(make_base(8, 40, 16)) == 1


def test_quant_bits_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match="Conv2d"):
        quant.quant_bits(torch.nn.Conv2d(1, 1, 1))


def test_prepare_for_adapter_stops_cpu_repacking() -> None:
    """An eval no-grad forward must not rewrite the packed weight (bitsandbytes' AVX512-BF16 repack)."""
    base = make_base(4, 128, 64)
    quant.prepare_for_adapter(base)
    before = quant.dequantize(base)
    base.eval()
    with torch.no_grad():
        base(torch.randn(2, 128))
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(quant.dequantize(base), before, rtol=0, atol=0)


@pytest.mark.parametrize("dq", [True, False], ids=["nf4-dq", "nf4"])
def test_4bit_row_ranges_are_bitsandbytes_own_values(dq: bool) -> None:
    """Each range dequantizes only its absmax entries (in whole nested blocks of 256): bit-identical to bnb's whole."""
    base = make_base(4, 192, 400, double_quant=dq)  # 3 absmax entries a row; nested blocks end mid-row
    whole = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    rows = quant.row_dequantizer(base, torch.float32)
    for a, b in [(0, 400), (0, 1), (85, 86), (85, 171), (170, 341), (399, 400)]:
        torch.testing.assert_close(rows(a, b), whole[a:b], rtol=0, atol=0)


def make_4bit(n_in: int, n_out: int, quant_type: str, double_quant: bool, blocksize: int) -> torch.nn.Module:
    """A 4-bit layer with a chosen blocksize (quantize_linear keeps bitsandbytes' default, 64)."""
    weight = make_base(None, n_in, n_out, bias=False).weight
    layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compress_statistics=double_quant, quant_type=quant_type,
                              device="meta")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=quant_type, module=layer).to("cpu")
    return layer


@pytest.mark.parametrize("qtype,dq", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)],
                         ids=["nf4-dq", "nf4", "fp4-dq", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128], ids=["bs64", "bs128"])
@pytest.mark.parametrize("n_in", [256, 192, 96], ids=["in=256", "in=192", "in=96"])
@pytest.mark.parametrize("flat", [False, True], ids=["rows", "experts"])
def test_a_sweep_gives_the_rows_of_single_calls_to_the_bit(qtype: str, dq: bool, blocksize: int, n_in: int,
                                                             flat: bool) -> None:
    """rows.sweep undoes the absmax of all its rows at once: the same values as each call undoing its own."""
    base = make_4bit(n_in, 200, qtype, dq, blocksize)  # 200 rows: nested absmax blocks end mid-row
    assert base.weight.quant_state.blocksize == blocksize
    if flat:  # 5 experts of 40 rows, read as stacked experts are, in chunks of whole blocks
        spans, step = [(e * 40, 40) for e in range(5)], 3 * quant.expert_row_alignment(n_in, 4, blocksize)
    else:
        spans, step = [(0, 200)], min(quant.row_alignment(base) * 24, 200)
    for first, count in spans:
        rows = quant.row_dequantizer(base, torch.float32, flat=flat, first=first)
        swept = rows.sweep(0, count)
        for a in range(0, count, step):
            b = min(a + step, count)
            torch.testing.assert_close(swept(a, b), rows(a, b), rtol=0, atol=0)
        if not flat:
            whole = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
            torch.testing.assert_close(swept(0, count), whole, rtol=0, atol=0)


def test_a_sweep_refuses_rows_outside_it() -> None:
    rows = quant.row_dequantizer(make_base(4, 128, 64), torch.float32)
    with pytest.raises(ValueError, match="outside the sweep"):
        rows.sweep(0, 32)(16, 48)


def test_int8_rows_in_bf16_are_bitsandbytes_fp32_values_rounded_once() -> None:
    base = make_base(8, 128, 300)
    whole = bnb.functional.int8_vectorwise_dequant(base.weight.data, quant._int8_scales(base))
    rows = quant.row_dequantizer(base, torch.bfloat16)
    for a, b in [(0, 300), (7, 40), (299, 300)]:
        torch.testing.assert_close(rows(a, b), whole[a:b].bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("bits,qtype,dq", QUANTS, ids=QIDS)
def test_dequantize_to_float64_is_the_fp32_weight_widened(bits: int, qtype: str, dq: bool) -> None:
    """bitsandbytes' CPU 4-bit kernel writes no fp64 (it returns unwritten memory): qmiss goes through fp32."""
    base = make_base(bits, 128, 96, quant_type=qtype, double_quant=dq)
    weight = quant.dequantize(base, torch.float64)
    assert weight.dtype == torch.float64
    torch.testing.assert_close(weight, quant.dequantize(base, torch.float32).double(), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [None, 4, 8], ids=["plain", "4bit", "8bit"])
def test_row_dequantizer_rejects_non_float_dtypes(bits: int | None) -> None:
    with pytest.raises(TypeError, match=r"dtype=torch\.int32.*torch\.float32"):
        quant.row_dequantizer(make_base(bits, 64, 64), torch.int32)


# Run before anything else in a fresh interpreter: bitsandbytes sees the CPU feature FORCE says (whatever this CPU
# has), and every network connection or name look-up is refused and reported on stderr.
_FORCED_CPU = """
import importlib.abc, importlib.util, socket, sys

FORCE = {force}

def refuse(*args, **kwargs):
    print("network attempted:", args[:2], file=sys.stderr)
    raise OSError("no network in this test")

socket.getaddrinfo = socket.create_connection = socket.socket.connect = refuse

class ForceAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: FORCE

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, ForceAvx512Bf16())
sys.argv = {argv}
import runpy
runpy.run_module("qmiss", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("avx512_bf16", [True, False], ids=["avx512-bf16", "no-avx512-bf16"])
def test_the_cli_is_quiet_and_offline_whatever_the_cpu(avx512_bf16: bool, tmp_path) -> None:
    """bitsandbytes 0.50 fetches a hub kernel at import on AVX512-BF16 CPUs and logs when it cannot; qmiss keeps
    its own kernels: the command's one-line error is all that is printed, and no connection is attempted."""
    missing = tmp_path / "missing.jsonl"
    argv = ["qmiss", "train", "--data_path", str(missing)]
    code = _FORCED_CPU.format(force=avx512_bf16, argv=argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"qmiss-train: error: --data_path {missing}: no such file or folder — check the path; "
        "a hub id is 'name' or 'owner/name'"]
    assert done.stdout == ""
    # the path was forced as asked: bitsandbytes' layers read the same answer
    check = _FORCED_CPU.format(force=avx512_bf16, argv=["x"]).replace(
        'runpy.run_module("qmiss", run_name="__main__", alter_sys=True)',
        "import qmiss, bitsandbytes as bnb; print(bnb.nn.Linear4bit(8, 8).support_avx512bf16_for_cpu)")
    probe = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, env=env)
    assert (probe.stdout.strip(), probe.stderr) == (str(avx512_bf16), "")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("n_in", [128, 96])
def test_stored_bytes_counts_what_bitsandbytes_stores(bits: int, dq: bool, n_in: int) -> None:
    """The planner's weight bytes (quant.stored_bytes) are the bytes of the weight and its quantization state."""
    layer = make_base(bits, n_in, 64, bias=False, double_quant=dq)
    weight = layer.weight
    tensors = [weight.data]
    if bits == 4:
        state = weight.quant_state
        tensors += [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if dq else [])
    else:
        tensors.append(weight.SCB)
    stored = sum(t.numel() * t.element_size() for t in tensors) + (4 if bits == 4 and dq else 0)  # the fp32 offset
    expected = quant.stored_bytes(n_in, 64, bits, dq, 2)
    if bits == 4:
        expected += 4 * 16  # the 16-entry fp32 nf4/fp4 code each layer points at; the planner leaves it out
    assert stored == expected
    assert quant.row_alignment(layer) == quant.row_alignment_of(n_in, 64, bits)


def test_bitsandbytes_8bit_cast_message_is_said_once(caplog, monkeypatch) -> None:
    """bitsandbytes logs the fp16 cast of MatMul8bitLt at every 8-bit call on CUDA; qmiss lets one through,
    saying what it means (fp16 activations, the ±65,504 limit), and drops the rest."""
    import logging

    monkeypatch.setattr(quant.INT8_CAST_NOTICE, "said", False)
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.autograd._functions"):
        for _ in range(3):  # what bitsandbytes logs, in its own words
            logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.bfloat16)
        logger.warning("something else")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and messages[1] == "something else"
    assert "torch.bfloat16 to float16" in messages[0] and "65,504" in messages[0] and "once" in messages[0]
