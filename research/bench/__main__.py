"""Fresh-process halves of ``compile``, ``memory`` and ``memory_lora``.

``python -m research.bench child SIDE JOBS SETUP``: SIDE is ``ours`` or ``reference``; JOBS
is ``train``, ``generate`` or both (``train,generate``, in that order). ``train`` trains GPT-2
(the first step, then a few more) and reads the process's peak resident memory, ``generate``
decodes greedily twice. It prints one JSON line, by job. A fresh process is what a user
starts: nothing compiled or cached yet. SETUP is the setup's name for ``ours``; for
``reference`` a JSON object ``{"setup": ReferenceSetup fields, "device": "cpu"|"cuda"}``
(research/bench/reference.py), which needs no JAX to read. Each side imports only its own
framework (an ``ours`` child no torch, a ``reference`` child no JAX), so each memory figure
is one framework's alone; the ``train`` job says which frameworks its process loaded.

``python -m research.bench lora SIDE SPEC`` trains as ``train`` does, one ``memory_lora``
case (research/bench/lora.py): SPEC is JSON, for ``ours`` ``{"setup", "shape", "mode"}``
(names), for ``reference`` ``lora.reference_spec``'s plain data and ``"device"``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from research.bench.batches import lm_batch


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's ``VmHWM`` first: ``ru_maxrss`` survives
    ``exec``, so a child started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _first_and_next(fn: Callable[[], Any], steps: int, shapes: dict[str, Any]) -> dict[str, Any]:
    first = _timed(fn)
    following = [_timed(fn) for _ in range(steps)]
    return {
        "first_result_s": first,
        "next_call_s": float(np.median(following)),
        "steps": 1 + steps,
        "shapes": shapes,
    }


def _trained(side: str, fn: Callable[[], Any], steps: int, shapes: dict) -> dict[str, Any]:
    """Train (the first step, then ``steps`` more), then the process's peak memory."""
    result = _first_and_next(fn, steps, shapes)
    result["peak_rss_mib"] = _peak_rss_mib()
    # What the peak covers: which frameworks this process loaded.
    result["frameworks"] = [name for name in ("jax", "torch") if name in sys.modules]
    if side == "ours":
        from research.bench import ours

        peak_bytes = ours.device_peak_bytes()
        if peak_bytes is not None:
            result["device_peak_bytes"] = peak_bytes
    return result


def lora_child(side: str, spec_arg: str) -> dict[str, Any]:
    """One ``memory_lora`` case in this fresh process: its train step, then the peak."""
    spec = json.loads(spec_arg)
    if side == "ours":
        from research.bench import lora
        from research.bench.common import make_setup

        setup = make_setup(spec["setup"])
        shape = lora.lora_shape(setup, spec["shape"], spec.get("layers"))
        fn: Callable[[], Any] = lora.ours_step(setup, shape, spec["mode"])
        steps, batch, seq = setup.memory_steps, shape.batch, shape.seq
    else:
        import transformers

        from research.bench import reference

        transformers.logging.set_verbosity_error()
        ref = reference.ReferenceSetup(**spec["setup"])
        model = reference.peft_lm(ref.decoder, spec["adapters"])
        inputs = lm_batch(np.random.default_rng(0), ref.batch, ref.seq, ref.decoder["vocab_size"])
        fn = reference.TrainStep(model, inputs, ref, spec["device"])
        steps, batch, seq = ref.memory_steps, ref.batch, ref.seq
    return _trained(side, fn, steps, {"batch": batch, "seq": seq})


def child(side: str, job: str, setup_arg: str) -> dict[str, Any]:
    """``train``: the first step, a few more, then the peak memory; ``generate``: two greedy
    decodings of one prompt. Each job runs in its own fresh process."""
    rng = np.random.default_rng(0)
    if side == "ours":
        from research.bench import ours
        from research.bench.common import make_setup

        setup: Any = make_setup(setup_arg)
        vocab_size = setup.decoder.vocab_size
    else:
        import transformers

        from research.bench import reference

        transformers.logging.set_verbosity_error()
        spec = json.loads(setup_arg)
        setup, device = reference.ReferenceSetup(**spec["setup"]), spec["device"]
        vocab_size = setup.decoder["vocab_size"]
    if job == "train":
        batch = lm_batch(rng, setup.batch, setup.seq, vocab_size)
        if side == "ours":
            model = ours.lm_model(setup)
            fn: Callable[[], Any] = ours.TrainStep(model, ours.random_params(model), batch)
        else:
            fn = reference.TrainStep(reference.lm_model(setup), batch, setup, device)
        return _trained(side, fn, setup.memory_steps, {"batch": setup.batch, "seq": setup.seq})
    prompt = rng.integers(0, vocab_size - 1, (1, setup.prompt), dtype=np.int32)
    if side == "ours":
        model = ours.lm_model(setup, decoding=True)
        # Prepared once per loaded model, as the reference's weights are loaded before timing.
        weights, _ = ours.decoding_weights(model, ours.random_params(model), "float32")
        fn = ours.greedy(model, weights, prompt, setup.new_tokens)
    else:
        fn = reference.greedy(reference.lm_model(setup), prompt, setup.new_tokens, setup, device)
    shapes = {"batch": 1, "prompt": setup.prompt, "new_tokens": setup.new_tokens}
    return _first_and_next(fn, 1, shapes)


SIDES, JOBS = ("ours", "reference"), ("train", "generate")


def main(argv: list[str]) -> int:
    if argv[:1] == ["lora"] and len(argv) == 3 and argv[1] in SIDES:
        print(json.dumps(lora_child(argv[1], argv[2])))
        return 0
    jobs = argv[2].split(",") if len(argv) == 4 else []
    if argv[:1] != ["child"] or argv[1] not in SIDES or not jobs or not set(jobs) <= set(JOBS):
        print(
            "usage: python -m research.bench child {ours,reference} JOB[,JOB] SETUP "
            "(JOB: train or generate; SETUP: a setup name, for reference its JSON), or "
            "python -m research.bench lora {ours,reference} SPEC (JSON)",
            file=sys.stderr,
        )
        return 2
    print(json.dumps({job: child(argv[1], job, argv[3]) for job in jobs}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
