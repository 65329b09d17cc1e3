"""The matrix products of one GPT-2 124M decoding step, alone: 12 layers' c_attn, attn c_proj,
c_fc, mlp c_proj, then the tied LM head, for M rows, in each decoding-weight layout.

``python experiments/bench/decode_products.py M [--bf16]`` prints one JSON line per layout: the
median milliseconds of the whole chain and the weight bytes it streams per millisecond (GB/s).
The weights are random and distinct per layer (497 MB in float32), so none stays in cache.
``--bf16`` takes the bfloat16 arrangements only (``x @ W^T``, weight-major, in-major; one row
also padded to two) next to PyTorch's ``F.linear`` on the same bfloat16 ``[out, in]`` weights,
all interleaved in one process.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12 + [(768, 50257)]  # [in, out]


def in_major(x, w):  # the kernel as nn.Dense trains it, [in, out]
    return lax.dot_general(
        x.astype(w.dtype), w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )


def out_major(x, w):  # [out, in], as research/models/decode_weights.py prepares it
    return lax.dot_general(
        x.astype(w.dtype), w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def weight_major(x, w):  # [out, in] as the left operand, then [out, M] transposed, as
    # research/models/precision.py's out_major_product runs it
    columns = lax.dot_general(
        w, x.astype(w.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    return lax.optimization_barrier(columns).T


def padded(product):  # one row padded to two, as out_major_product pads a bfloat16 row
    def run(x, w):
        pad = jnp.concatenate([x, jnp.zeros_like(x)]) if x.shape[0] == 1 else x
        return product(pad, w)[: x.shape[0]]

    return run


def chain(product, weights, rows: int, width_axis: int):
    inputs = {n: jnp.ones((rows, n)) for n in (768, 3072)}
    run = jax.jit(lambda xs, ws: sum(product(xs[w.shape[width_axis]], w).sum() for w in ws))
    return lambda: run(inputs, weights).block_until_ready()


def torch_chain(weights, rows: int):
    """PyTorch's bfloat16 ``F.linear`` (``x @ W^T``) over the same ``[out, in]`` weights."""
    import torch

    tw = [torch.from_numpy(np.array(w.astype(jnp.float32))).to(torch.bfloat16) for w in weights]
    inputs = {n: torch.ones((rows, n), dtype=torch.bfloat16) for n in (768, 3072)}

    def run():
        with torch.inference_mode():
            return sum(torch.nn.functional.linear(inputs[w.shape[1]], w).float().sum() for w in tw)

    return run


def layouts_float32(rows: int, kernels, transposed) -> dict:
    bf16 = [w.astype(jnp.bfloat16) for w in transposed]
    return {
        "in_major float32": (chain(in_major, kernels, rows, 0), kernels),
        "out_major float32": (chain(out_major, transposed, rows, 1), transposed),
        "out_major float32, weight-major": (chain(weight_major, transposed, rows, 1), transposed),
        "out_major bfloat16": (chain(out_major, bf16, rows, 1), bf16),
        "out_major bfloat16, 1 row padded to 2": (chain(padded(out_major), bf16, rows, 1), bf16),
    }


def layouts_bf16(rows: int, kernels, transposed) -> dict:
    bf16_in = [w.astype(jnp.bfloat16) for w in kernels]
    bf16 = [w.astype(jnp.bfloat16) for w in transposed]
    layouts = {
        "in_major bfloat16": (chain(in_major, bf16_in, rows, 0), bf16_in),
        "out_major bfloat16 (x @ W^T)": (chain(out_major, bf16, rows, 1), bf16),
        "out_major bfloat16, weight-major": (chain(weight_major, bf16, rows, 1), bf16),
    }
    if rows == 1:
        for name, product in [("x @ W^T", out_major), ("weight-major", weight_major)]:
            layouts[f"out_major bfloat16 ({name}), 1 row padded to 2"] = (
                chain(padded(product), bf16, rows, 1),
                bf16,
            )
    layouts["torch bfloat16 F.linear (x @ W^T)"] = (torch_chain(bf16, rows), bf16)
    return layouts


def main(rows: int, bf16_only: bool) -> None:
    rng = np.random.default_rng(0)
    kernels = [jnp.asarray(0.02 * rng.standard_normal(s, np.float32)) for s in SHAPES]
    transposed = [w.T.copy() for w in kernels]
    layouts = (layouts_bf16 if bf16_only else layouts_float32)(rows, kernels, transposed)
    if bf16_only:
        del kernels, transposed
    for fn, _ in layouts.values():
        fn(), fn()
    times = {name: [] for name in layouts}
    for _ in range(7):
        for name, (fn, _) in layouts.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, (_, weights) in layouts.items():
        seconds = float(np.median(times[name]))
        size = sum(w.nbytes for w in weights)
        print(json.dumps({"rows": rows, "layout": name, "ms": round(seconds * 1e3, 2),
                          "weight_MB": round(size / 1e6, 1), "GB/s": round(size / seconds / 1e9, 2)}))  # fmt: skip


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--bf16"]
    main(int(args[0]) if args else 1, "--bf16" in sys.argv[1:])
