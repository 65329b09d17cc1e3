"""The measurements of ``research bench``: each takes the run's shared state
(:class:`research.bench.run_state.Run`) and returns rows."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from research.bench import agreement, lora, ours, reference, throughput
from research.bench.batches import conditioned_batch, lm_batch
from research.bench.common import (
    Setup,
    interleaved,
    lm_train_flops_per_token,
    matmul_flops,
    median,
)
from research.bench.run_state import Run

MEASUREMENTS = (
    "train_lm",
    "train_conditioned",
    "train_frozen_encoder",
    "loop_overhead",
    "generate",
    "compile",
    "memory",
    "train_llama",
    "generate_llama",
    "memory_lora",
    "train_lora",
    "train_lm_bf16",
    "train_conditioned_bf16",
    "generate_bf16",
)


# --- The measurements ---------------------------------------------------------------------------


def _speed_row(
    measurement: str,
    case: str,
    tokens: int,
    times: dict[str, list[float]],
    shapes: dict[str, Any],
    **details,
) -> dict[str, Any]:
    """A row comparing tokens per second (higher is better)."""
    ours_tps = tokens / median(times["ours"])
    ref_tps = tokens / median(times["reference"]) if "reference" in times else None
    return {
        "measurement": measurement,
        "case": case,
        "unit": "tokens/s",
        "better": "higher",
        "ours": ours_tps,
        "reference": ref_tps,
        "ratio": ours_tps / ref_tps if ref_tps else None,
        "shapes": shapes,
        "seconds": times,
        **details,
    }


def _mfu(
    run: Run, flops_per_step: float, times: dict[str, list[float]], dtype: str
) -> dict[str, Any]:
    """MFU fields against the run's peak so far in ``dtype``; ``run_bench`` redoes them with
    the final one."""
    peak = run.peak(dtype)
    mfu = {side: flops_per_step / median(t) / peak["used"] for side, t in times.items()}
    return {
        "model_flops_per_step": flops_per_step,
        "peak_flops": peak["used"],
        "peak_source": peak["source"],
        "matmul_flops_per_s": {
            "n": peak["n"],
            "jax": peak["jax"],
            "torch": peak["torch"],
            "trials": peak["trials"],
        },
        "mfu": mfu,
        # Above 100% the peak, not the model, is wrong: the table prints "invalid peak".
        "mfu_valid": {side: bool(value <= 1.0) for side, value in mfu.items()},
    }


def final_mfu(row: dict[str, Any], run: Run) -> dict[str, Any]:
    """``row`` with its MFU fields against the run's final peak."""
    if "model_flops_per_step" not in row:
        return row
    return {**row, **_mfu(run, row["model_flops_per_step"], row["seconds"], row["dtype"])}


def _train_compare(run: Run, mine: ours.TrainStep, theirs: reference.TrainStep | None):
    """Warm up (the first call compiles ours), then take turns; also the first losses."""
    steps: dict[str, Callable[[], float]] = {"ours": mine}
    if theirs is not None:
        steps["reference"] = theirs
    first_loss = {side: step() for side, step in steps.items()}
    times = interleaved(steps, max(run.setup.warmup - 1, 0), run.setup.repeats)
    return times, first_loss


def _with_llama(run: Run) -> Setup:
    """The run's setup with its Llama-family decoder in the decoder's place."""
    return dataclasses.replace(run.setup, decoder=run.setup.llama)


def _in_bf16(measure: Callable[[Run, str, Setup], list[dict]], name: str):
    """``measure`` as a ``NAME_bf16`` row: ours with ``model.dtype=bfloat16`` (float32
    parameters), the reference under ``torch.autocast(bfloat16)``. No rows where the setup
    computes in bfloat16 already (gpu): its own rows are those."""

    def bf16_rows(run: Run) -> list[dict]:
        if run.setup.dtype == "bfloat16":
            return []
        return measure(run, name, dataclasses.replace(run.setup, dtype="bfloat16"))

    return bf16_rows


def measure_train_lm(run: Run, name: str = "train_lm", s: Setup | None = None) -> list[dict]:
    s = s or run.setup
    rng = np.random.default_rng(0)
    ref = reference.ReferenceSetup.of(s)
    torch_model = reference.lm_model(ref)
    params = ours.params_from_reference(torch_model, s)  # both sides start from the same weights
    batch = lm_batch(rng, s.batch, s.seq, s.decoder.vocab_size)
    mine = ours.TrainStep(ours.lm_model(s), params, batch)
    theirs = None
    if run.reference_device is not None:
        theirs = reference.TrainStep(torch_model, batch, ref, run.reference_device)
    times, first_loss = _train_compare(run, mine, theirs)
    tokens = s.batch * s.seq
    flops = lm_train_flops_per_token(params, s.decoder, s.seq) * tokens
    return [
        _speed_row(
            name,
            f"{s.batch} x {s.seq} tokens",
            tokens,
            times,
            {"batch": s.batch, "seq": s.seq, "vocab": s.decoder.vocab_size},
            decoder=s.decoder.model_type,
            first_loss=first_loss,
            flops_formula="6 N + 12 L d T per token (N: kernels + a tied embedding)",
            dtype=s.dtype,
            **_mfu(run, flops, times, s.dtype),
        )
    ]


def measure_train_conditioned(
    run: Run, name: str = "train_conditioned", s: Setup | None = None
) -> list[dict[str, Any]]:
    s = s or run.setup
    rng = np.random.default_rng(0)
    model = ours.conditioned_model(s)
    params = ours.random_params(model)
    batch = conditioned_batch(rng, s)
    mine = ours.TrainStep(model, params, batch)
    theirs = None
    if run.reference_device is not None:
        ref = reference.ReferenceSetup.of(s)
        torch_model = reference.conditioned_model(ref)
        theirs = reference.TrainStep(torch_model, batch, ref, run.reference_device)
    times, first_loss = _train_compare(run, mine, theirs)
    forward = matmul_flops(lambda p: model.apply({"params": p}, batch), params)
    return [
        _speed_row(
            name,
            f"{s.batch} x ({s.encoder_seq} encoder + {s.seq} decoder) tokens",
            s.batch * s.seq,
            times,
            {"batch": s.batch, "seq": s.seq, "encoder_seq": s.encoder_seq},
            first_loss=first_loss,
            flops_formula="3 x the matrix products of our forward pass (counted on its jaxpr)",
            dtype=s.dtype,
            **_mfu(run, 3.0 * forward, times, s.dtype),
        )
    ]


def _keeping(store: dict[str, np.ndarray], side: str, fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` whose latest result is kept in ``store[side]`` (to compare the tokens after)."""
    return lambda: store.__setitem__(side, np.asarray(fn()))


def measure_generate(run: Run, name: str = "generate", s: Setup | None = None) -> list[dict]:
    """Greedy decoding for each ``sampling.weights_dtype`` and batch size. The reference holds
    the same weights: float32, or rounded to bfloat16 for the bfloat16 rows (``model.to``);
    those rows also carry the greedy token agreement with float32 on a trained decoder."""
    s = s or run.setup
    ref = reference.ReferenceSetup.of(s)
    torch_model = reference.lm_model(ref)
    params = ours.params_from_reference(torch_model, s)
    model = ours.lm_model(s, decoding=True)
    rows = []
    for weights_dtype in run.weights_dtypes:
        weights, prepare_seconds = ours.decoding_weights(model, params, weights_dtype)
        theirs = reference.with_weights_dtype(torch_model, weights_dtype)
        details = {"weights_dtype": weights_dtype, "prepare_weights_s": prepare_seconds}
        details["dtype"] = s.dtype
        if weights_dtype != "float32":
            steps = 20 if s.name == "smoke" else 300  # smoke: the fields, not the figure
            details["agreement_with_float32"] = agreement.greedy_agreement(weights_dtype, steps)
        suffix = "" if weights_dtype == "float32" else f", {weights_dtype} weights"
        rng = np.random.default_rng(0)
        for size in s.generate_batches:
            # Prompts avoid the EOS id (the last one), as real prompts do.
            prompt = rng.integers(0, s.decoder.vocab_size - 1, (size, s.prompt), dtype=np.int32)
            outputs: dict[str, np.ndarray] = {}
            fn = ours.greedy(model, weights, prompt, s.new_tokens)
            runs = {"ours": _keeping(outputs, "ours", fn)}
            if run.reference_device is not None:
                fn = reference.greedy(theirs, prompt, s.new_tokens, ref, run.reference_device)
                runs["reference"] = _keeping(outputs, "reference", fn)
            times = interleaved(runs, s.warmup, s.repeats)
            same = {}
            if "reference" in outputs:
                same["same_tokens"] = float((outputs["ours"] == outputs["reference"]).mean())
            rows.append(
                _speed_row(
                    name,
                    f"batch {size}{suffix}",
                    size * s.new_tokens,
                    times,
                    {"batch": size, "prompt": s.prompt, "new_tokens": s.new_tokens},
                    decoder=s.decoder.model_type,
                    strategy="greedy",
                    **details,
                    **same,
                )
            )
        del weights, theirs
    return rows


def measure_compile(run: Run) -> list[dict[str, Any]]:
    rows = []
    for case, job in (("train step", "train"), ("sampler", "generate")):
        mine = run.child("ours", job)
        theirs = run.child("reference", job) if run.reference_device is not None else None
        ref_s = theirs["first_result_s"] if theirs else None
        rows.append(
            {
                "measurement": "compile",
                "case": case,
                "unit": "s",
                "better": "lower",
                "ours": mine["first_result_s"],
                "reference": ref_s,
                "ratio": mine["first_result_s"] / ref_s if ref_s else None,
                "shapes": mine["shapes"],
                # What one more call costs once compiled: the rest of the first call compiled.
                "ours_next_call_s": mine["next_call_s"],
                "reference_next_call_s": theirs["next_call_s"] if theirs else None,
                "note": "fresh process each; PyTorch compiles nothing (its first call is eager)",
            }
        )
    return rows + throughput.measure_warm_compile(run)


def measure_memory(run: Run) -> list[dict[str, Any]]:
    mine = run.child("ours", "train")
    theirs = run.child("reference", "train") if run.reference_device is not None else None
    ref_mib = theirs["peak_rss_mib"] if theirs else None
    return [
        {
            "measurement": "memory",
            "case": f"training, {mine['steps']} steps",
            "unit": "MiB peak RSS",
            "better": "lower",
            "ours": mine["peak_rss_mib"],
            "reference": ref_mib,
            "ratio": mine["peak_rss_mib"] / ref_mib if ref_mib else None,
            "shapes": mine["shapes"],
            "ours_device_peak_bytes": mine.get("device_peak_bytes"),
            "frameworks": {
                "ours": mine["frameworks"],
                "reference": theirs and theirs["frameworks"],
            },
            "note": "fresh process each, whole-process peak (imports, compilation included); "
            "each process loads only its own framework",
        }
    ]


MEASURE: dict[str, Callable[[Run], list[dict[str, Any]]]] = {
    "train_lm": measure_train_lm,
    "train_conditioned": measure_train_conditioned,
    "train_frozen_encoder": throughput.measure_train_frozen_encoder,
    "loop_overhead": throughput.measure_loop_overhead,
    "generate": measure_generate,
    "compile": measure_compile,
    "memory": measure_memory,
    "train_llama": lambda run: measure_train_lm(run, "train_llama", _with_llama(run)),
    "generate_llama": lambda run: measure_generate(run, "generate_llama", _with_llama(run)),
    "memory_lora": lora.measure_memory_lora,
    "train_lora": lora.measure_train_lora,
    "train_lm_bf16": _in_bf16(measure_train_lm, "train_lm_bf16"),
    "train_conditioned_bf16": _in_bf16(measure_train_conditioned, "train_conditioned_bf16"),
    "generate_bf16": _in_bf16(measure_generate, "generate_bf16"),
}
