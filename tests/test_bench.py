"""``research bench`` (research/bench): the smoke run end to end, and its FLOP counting.

The smoke run uses tiny models, so its speeds mean nothing; what it checks is that every
measurement runs, on both sides, and writes complete rows. Two references keep the figures
honest: both sides start from the same weights (equal first losses, equal greedy tokens), and
the closed-form FLOP count equals the matrix products counted on the model's jaxpr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from research.bench import MEASUREMENTS, lora, markdown_table, ours, run_bench, target_for
from research.bench.batches import lm_batch
from research.bench.common import (
    card_peak_flops,
    lm_train_flops_per_token,
    make_setup,
    matmul_flops,
)
from research.bench.report import _value
from research.config import ConfigError

EXPECTED_ROWS = {
    ("train_lm", "2 x 16 tokens"),
    ("train_conditioned", "2 x (16 encoder + 16 decoder) tokens"),
    ("generate", "batch 1"),
    ("generate", "batch 2"),
    ("generate", "batch 1, bfloat16 weights"),
    ("generate", "batch 2, bfloat16 weights"),
    ("compile", "train step"),
    ("compile", "sampler"),
    ("compile", "train step, warm persistent cache"),
    ("memory", "training, 2 steps"),
    ("train_llama", "2 x 16 tokens"),
    ("generate_llama", "batch 1"),
    ("generate_llama", "batch 2"),
    ("generate_llama", "batch 1, bfloat16 weights"),
    ("generate_llama", "batch 2, bfloat16 weights"),
    ("train_frozen_encoder", "prefix, 4 x (16 encoder + 16) tokens"),
    ("train_frozen_encoder", "cross_attention, 4 x (16 encoder + 16) tokens"),
    ("loop_overhead", "train() vs its bare step, 8 x GPT-2 1x64"),
    *(
        (measurement, f"{shape}: {case}")
        for shape in ("gpt2_large", "llama_1b")
        for measurement, case in (
            ("memory_lora", "LoRA r8 / full fine-tuning (ours)"),
            ("memory_lora", "LoRA r8, ours / PyTorch + PEFT"),
            ("train_lora", "LoRA r8, bfloat16 base, 2 x 16 tokens"),
        )
    ),
    ("train_lm_bf16", "2 x 16 tokens"),
    ("train_conditioned_bf16", "2 x (16 encoder + 16 decoder) tokens"),
    ("generate_bf16", "batch 1"),
    ("generate_bf16", "batch 2"),
    ("generate_bf16", "batch 1, bfloat16 weights"),
    ("generate_bf16", "batch 2, bfloat16 weights"),
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of every measurement: (rows returned, JSON lines written, stdout)."""
    path = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rows = run_bench(only=None, json_path=str(path), smoke=True)
    written = [json.loads(line) for line in path.read_text().splitlines()]
    return rows, written, stdout.getvalue()


def test_smoke_writes_one_complete_row_per_measurement(smoke):
    rows, written, _ = smoke
    assert written == json.loads(json.dumps(rows))
    assert {(r["measurement"], r["case"]) for r in written} == EXPECTED_ROWS
    assert {r["measurement"] for r in written} == set(MEASUREMENTS)
    for row in written:
        where = f"{row['measurement']} / {row['case']}"
        dtype = "bfloat16" if row["measurement"].endswith("_bf16") else "float32"
        assert row["setup"] == "smoke" and row["dtype"] == dtype, where
        assert math.isfinite(row["ours"]) and row["ours"] > 0, where
        assert math.isfinite(row["reference"]) and row["reference"] > 0, where
        assert row["ratio"] == pytest.approx(row["ours"] / row["reference"]), where
        assert row["better"] in ("higher", "lower"), where
        assert row["shapes"], where
        # Smoke shapes are not the issue's: no target applies.
        assert row["target"] is None and row["meets_target"] is None, where
        assert row["machine"]["cpu"] and row["machine"]["cores"] >= 1, where
        assert isinstance(row["machine"]["cpu_features"], list), where
        assert row["device"] == {
            "platform": jax.devices()[0].platform,
            "kind": jax.devices()[0].device_kind,
            "count": jax.device_count(),
        }, where
        assert row["versions"]["jax"] == jax.__version__, where
        assert row["versions"]["torch"] == torch.__version__, where
        assert row["versions"]["transformers"] == transformers.__version__, where


def test_smoke_timings_are_medians_of_the_repeats(smoke):
    _, written, _ = smoke
    setup = make_setup("smoke")
    for row in written:
        if row["unit"] != "tokens/s":
            continue
        tokens = row["shapes"]["batch"] * row["shapes"].get("new_tokens", row["shapes"].get("seq"))
        for side in ("ours", "reference"):
            seconds = row["seconds"][side]
            assert len(seconds) == setup.repeats
            assert row[side] == pytest.approx(tokens / float(np.median(seconds)))


def test_smoke_both_sides_run_the_same_network(smoke):
    """Same weights: the first training losses agree, greedy decoding picks the same tokens."""
    _, written, _ = smoke
    by_key = {(r["measurement"], r["case"]): r for r in written}
    for train, generate in (("train_lm", "generate"), ("train_llama", "generate_llama")):
        loss = by_key[(train, "2 x 16 tokens")]["first_loss"]
        assert loss["ours"] == pytest.approx(loss["reference"], rel=1e-5)
        # Random tokens over a 1000-word vocabulary: the loss starts near log(1000).
        assert loss["ours"] == pytest.approx(math.log(1000), rel=0.05)
        for case in ("batch 1", "batch 2"):
            assert by_key[(generate, case)]["same_tokens"] == 1.0
            # bfloat16 weights on both sides (rounded alike; activations are not): the row
            # carries the greedy agreement with float32 of a decoder trained in the bench.
            bf16 = by_key[(generate, f"{case}, bfloat16 weights")]
            assert bf16["weights_dtype"] == "bfloat16" and 0 <= bf16["same_tokens"] <= 1
            agreement = bf16["agreement_with_float32"]
            assert 0 <= agreement["token_agreement"] <= 1 and agreement["steps"] == 20
    # bfloat16 against autocast: the same network, rounded at other points.
    loss = by_key[("train_lm_bf16", "2 x 16 tokens")]["first_loss"]
    assert loss["ours"] == pytest.approx(loss["reference"], rel=1e-2)


def test_smoke_compile_memory_and_mfu_fields(smoke):
    _, written, _ = smoke
    by_key = {(r["measurement"], r["case"]): r for r in written}
    for case in ("train step", "sampler"):
        row = by_key[("compile", case)]
        # The first call compiles, so it takes longer than the next one.
        assert row["ours"] > row["ours_next_call_s"] > 0
    warm = by_key[("compile", "train step, warm persistent cache")]
    # Loaded from the cache an identical process filled: faster than that process's compile.
    assert 0 < warm["ours"] < warm["ours_cold_cache_s"]
    memory = by_key[("memory", "training, 2 steps")]
    for side in ("ours", "reference"):
        assert 100 < memory[side] < 64 * 1024  # MiB
    assert memory["frameworks"]["ours"] == ["jax"]  # each framework alone: no torch in ours
    assert memory["frameworks"]["reference"] == ["torch"]  # and no JAX in the reference
    for row in (r for r in written if r["measurement"] == "memory_lora"):
        frameworks = {name: child["frameworks"] for name, child in row["children"].items()}
        assert frameworks == {
            "ours_lora": ["jax"],
            "ours_full": ["jax"],
            "reference_lora": ["torch"],
        }
    for name in ("train_lm", "train_conditioned", "train_lm_bf16"):
        row = next(r for r in written if r["measurement"] == name)
        assert row["peak_flops"] > 1e9 and row["peak_source"] == "measured matmul"
        # Each dtype's peak: sampled before every measurement (bfloat16: from its first row on).
        trials = 4 if name.endswith("_bf16") else len(MEASUREMENTS) + 1
        assert row["matmul_flops_per_s"]["trials"] == trials
        for side in ("ours", "reference"):
            assert 0 < row["mfu"][side] < 1.5
            assert row["mfu_valid"][side] == (row["mfu"][side] <= 1.0)


@pytest.mark.parametrize(
    "modules, loaded",
    [
        ("research.bench.__main__, research.bench.reference", ["torch"]),
        ("research.bench.__main__, research.bench.ours, research.bench.common", ["jax"]),
        ("research.bench.__main__, research.bench.lora", ["jax"]),  # an ours memory_lora child
    ],
)
def test_each_side_imports_only_its_own_framework(modules, loaded):
    """A fresh process importing one side (and the child entry point) has only that side's
    framework in ``sys.modules``: the memory row measures each framework alone."""
    code = f"import sys, {modules}; print([m for m in ('jax', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(loaded)


def test_mfu_above_the_peak_is_printed_as_an_invalid_peak():
    row = {"ours": 50.0, "unit": "tokens/s", "mfu": {"ours": 1.13}, "mfu_valid": {"ours": False}}
    assert _value(row, "ours") == "50.0 tokens/s (MFU invalid peak)"
    row |= {"mfu": {"ours": 0.98}, "mfu_valid": {"ours": True}}
    assert _value(row, "ours") == "50.0 tokens/s (MFU 98%)"


def test_smoke_prints_the_markdown_table(smoke):
    rows, written, printed = smoke
    assert markdown_table(written) in printed
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| measurement | case | ours |")
    assert len(table) == 1 + len(rows)
    for line, row in zip(table[1:], rows, strict=True):
        assert line.startswith(f"| {row['measurement']} | {row['case']} | ")
        assert f"{row['ratio']:.2f}x" in line


def test_unknown_measurement_is_rejected_with_the_valid_names():
    with pytest.raises(ConfigError, match="valid measurements are .*train_lm"):
        run_bench(only=["train_lm", "speed"], smoke=True)


class _FakeRun:
    """A run without measuring: its peak only counts the samples taken."""

    def __init__(self, setup, weights_dtypes):
        self.setup, self.samples = setup, 0

    def sample_peak(self):
        self.samples += 1


def test_json_is_replaced_or_appended_to_with_the_final_mfu(monkeypatch, tmp_path):
    """Two runs into one file: without ``append`` the second run's rows replace the file's,
    with it they follow them; either way the rows rewritten against the run's final peak are
    this run's alone."""
    from research.bench import run as run_module

    calls = iter(range(10))

    def measure(run):
        case = f"call {next(calls)}"
        row = {"ours": None, "reference": None, "unit": "tokens/s", "ratio": None}
        return [{"measurement": "train_lm", "case": case, "model_flops_per_step": 1, **row}]

    monkeypatch.setattr(run_module, "Run", _FakeRun)
    monkeypatch.setattr(run_module, "MEASURE", {"train_lm": measure})
    # In place of the MFU: the peak samples its run had taken by the end (before it, at the end).
    final = lambda row, run: {**row, "samples": run.samples}  # noqa: E731
    monkeypatch.setattr(run_module, "final_mfu", final)
    path = tmp_path / "bench.jsonl"
    path.write_text('{"earlier": true}\n')

    def lines():
        return [json.loads(line) for line in path.read_text().splitlines()]

    with contextlib.redirect_stdout(io.StringIO()):
        run_bench(only=["train_lm"], json_path=str(path), smoke=True, append=True)
        assert [line.get("case") for line in lines()] == [None, "call 0"]
        run_bench(only=["train_lm"], json_path=str(path), smoke=True, append=True)
        assert [line.get("case") for line in lines()] == [None, "call 0", "call 1"]
        assert [line.get("samples") for line in lines()[1:]] == [2, 2]
        run_bench(only=["train_lm"], json_path=str(path), smoke=True)
        assert [(line["case"], line["samples"]) for line in lines()] == [("call 2", 2)]
    with pytest.raises(ConfigError, match="--append adds to a --json FILE"):
        run_bench(only=["train_lm"], smoke=True, append=True)


def test_weights_dtype_limits_the_generate_rows(tmp_path):
    """``--weights-dtype float32``: only the float32 generate rows, one per batch size (on a
    CPU without bfloat16 kernels PyTorch's bfloat16 reference alone takes half an hour)."""
    with contextlib.redirect_stdout(io.StringIO()):
        rows = run_bench(only=["generate"], smoke=True, weights_dtypes=["float32"])
    assert [row["weights_dtype"] for row in rows] == ["float32"] * len(
        make_setup("smoke").generate_batches
    )
    with pytest.raises(ConfigError, match=r"valid dtypes are \['float32', 'bfloat16'\]"):
        run_bench(only=["generate"], smoke=True, weights_dtypes=["float16"])


@pytest.mark.parametrize("decoder", ["gpt2", "llama"])
def test_lm_flops_formula_equals_matmuls_counted_on_the_jaxpr(decoder):
    """6 N + 12 L d T per token == 3 x the forward's matrix products, counted one by one."""
    setup = make_setup("smoke")
    if decoder == "llama":
        setup = dataclasses.replace(setup, decoder=setup.llama)
    model = ours.lm_model(setup)
    params = ours.random_params(model)
    batch = lm_batch(np.random.default_rng(0), setup.batch, setup.seq, setup.decoder.vocab_size)
    forward = matmul_flops(lambda p: model.apply({"params": p}, batch), params)
    tokens = setup.batch * setup.seq
    closed = lm_train_flops_per_token(params["decoder"], setup.decoder, setup.seq) * tokens
    assert closed == 3 * forward


def test_matmul_flops_counts_products_and_scan_bodies():
    a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
    assert matmul_flops(jnp.dot, a, b) == 2 * 3 * 4 * 5
    assert matmul_flops(lambda x: jnp.einsum("bij,bjk->bik", x, x), jnp.ones((2, 6, 6))) == (
        2 * 2 * 6 * 6 * 6
    )

    def loop(x):
        return jax.lax.scan(lambda c, _: (c @ b.T @ b, None), x, length=7)[0]

    assert matmul_flops(loop, jnp.ones((3, 5))) == 7 * 2 * (2 * 3 * 5 * 4)


def test_targets_and_card_peaks():
    target, check = target_for("cpu", "train_lm", "8 x 128 tokens")
    assert target == ">= 1.25x"
    assert check({"ratio": 1.3}) and not check({"ratio": 1.2}) and not check({"ratio": None})
    assert target_for("cpu", "generate", "batch 16")[1]({"ratio": 2.1})
    assert target_for("cpu", "generate", "batch 16, bfloat16 weights")[0] == ">= 2x"
    assert target_for("cpu", "generate", "batch 1, bfloat16 weights")[0] == ">= 1.5x"
    assert not target_for("cpu", "compile", "sampler")[1]({"ours": 12.0})
    assert not target_for("cpu", "memory", "training, 3 steps")[1]({"ratio": 1.12})
    assert not target_for("cpu", "compile", "train step, warm persistent cache")[1]({"ours": 4.0})
    prefix = target_for("cpu", "train_frozen_encoder", "prefix, 64 x (256 encoder + 22) tokens")
    cross = target_for("cpu", "train_frozen_encoder", "cross_attention, 64 x (256 + 22)")
    assert prefix[0] == ">= 3x" and cross[0] == ">= 2x" and cross[1]({"ratio": 2.1})
    assert not target_for("cpu", "loop_overhead", "train()")[1]({"ratio": 0.9})
    assert target_for("gpu", "train_lm", "16 x 1024 tokens")[1]({"mfu": {"ours": 0.45}})
    assert target_for("smoke", "train_lm", "2 x 16 tokens") is None
    assert card_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert card_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert card_peak_flops("NVIDIA H200") == 989e12
    assert card_peak_flops("Tesla T4") is None


def test_lora_memory_needs_count_gpt2_large_parameters():
    """GPT-2 large has 774,030,080 parameters (wte 50257 x 1280, wpe 1024 x 1280, 36 blocks of
    19,677,440, ln_f); LoRA r8 on c_attn (1280 -> 3840) and attn c_proj (1280 -> 1280) adds
    8 x (1280 + 3840 + 1280 + 1280) per block. Each kind of child's estimated peak is its bytes
    per parameter times that count; the deepest prefix that fits a budget is found exactly."""
    setup = make_setup("cpu")
    shape = lora.lora_shape(setup, "gpt2_large")
    count = 774_030_080 + 36 * 8 * (1280 + 3840 + 1280 + 1280)
    for kind, per_parameter in lora.PEAK_BYTES_PER_PARAMETER.items():
        assert lora.needed_bytes(setup, shape, kind) == per_parameter * count
    twenty = lora.needed_bytes(setup, lora.lora_shape(setup, "gpt2_large", 20), "full")
    assert lora.fitting_layers(setup, shape, twenty) == 20
    assert lora.fitting_layers(setup, shape, twenty - 1) == 19
    assert lora.fitting_layers(setup, shape, 10**15) == 36
    assert lora.fitting_layers(setup, shape, 10**6) is None
