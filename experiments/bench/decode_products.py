"""The matrix products of one GPT-2 124M decoding step, alone: 12 layers' c_attn, attn c_proj,
c_fc, mlp c_proj, then the tied LM head, for M rows, in each decoding-weight layout.

``python experiments/bench/decode_products.py M`` prints one JSON line per layout: the median
milliseconds of the whole chain and the weight bytes it streams per millisecond (GB/s). The
weights are random and distinct per layer (497 MB in float32), so none stays in cache.
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
    return lax.dot_general(x, w, (((1,), (0,)), ((), ())))


def out_major(x, w):  # [out, in], as research/models/decode_weights.py prepares it
    operand = w.dtype
    return lax.dot_general(
        x.astype(operand), w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def weight_major(x, w):  # [out, in] as the left operand, then [out, M] transposed, as
    # research/models/precision.py's out_major_product runs 2 to 128 float32 rows
    return lax.optimization_barrier(lax.dot_general(w, x, (((1,), (1,)), ((), ())))).T


def out_major_padded(x, w):  # one bfloat16 row padded to two, as decode_weights does
    pad = jnp.concatenate([x, jnp.zeros_like(x)]) if x.shape[0] == 1 else x
    return out_major(pad, w)[: x.shape[0]]


def chain(product, weights, rows: int, width_axis: int):
    inputs = {n: jnp.ones((rows, n)) for n in (768, 3072)}
    run = jax.jit(lambda xs, ws: sum(product(xs[w.shape[width_axis]], w).sum() for w in ws))
    return lambda: run(inputs, weights).block_until_ready()


def main(rows: int) -> None:
    rng = np.random.default_rng(0)
    kernels = [jnp.asarray(0.02 * rng.standard_normal(s, np.float32)) for s in SHAPES]
    transposed = [w.T.copy() for w in kernels]
    bf16 = [w.astype(jnp.bfloat16) for w in transposed]
    layouts = {
        "in_major float32": (chain(in_major, kernels, rows, 0), kernels),
        "out_major float32": (chain(out_major, transposed, rows, 1), transposed),
        "out_major float32, weight-major": (chain(weight_major, transposed, rows, 1), transposed),
        "out_major bfloat16": (chain(out_major, bf16, rows, 1), bf16),
        "out_major bfloat16, 1 row padded to 2": (chain(out_major_padded, bf16, rows, 1), bf16),
    }
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
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
