"""The matrix products of one GPT-2 124M training step (8 x 128 tokens), alone, in XLA:CPU's
operand arrangements against ``torch.mm`` on the same shapes, in one process.

    python experiments/bench/train_products.py [--repeats 7] >> FILE.jsonl

One JSON line per (product, arrangement): the median milliseconds of one product and its
GFLOP/s. Every dense layer ``y = x @ W`` (``x [M, in]``, ``W [in, out]``) has three products:
forward, ``dX = dY @ W^T`` and ``dW = X^T @ dY``; the tied LM head's table is ``[vocab, d]``.
An arrangement computes the same product from the operands as the step holds them; a
transposed copy or a transposed result stays behind ``lax.optimization_barrier`` so XLA's
simplifier cannot fold it back into the product.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

M = 8 * 128
DENSE = {"c_attn": (768, 2304), "attn_c_proj": (768, 768), "c_fc": (768, 3072)}
DENSE["mlp_c_proj"] = (3072, 768)
VOCAB, D = 50257, 768


def _dot(a, b, ca, cb):
    return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())))


def _t(a):  # a transposed copy that XLA keeps
    return lax.optimization_barrier(a.T)


def _tr(y):  # a result transposed after the product, kept as computed
    return lax.optimization_barrier(y).T


# Each product's arrangements: name -> fn(a, b) giving the same result.
FORWARD = {  # x [M, in], W [in, out] -> [M, out]
    "x @ W": lambda x, w: _dot(x, w, 1, 0),
    "(W^T @ x^T)^T": lambda x, w: _tr(_dot(w, x, 0, 1)),
    "x @ copy(W^T)^T": lambda x, w: _dot(x, _t(w), 1, 1),
    "(copy(W^T) @ x^T)^T": lambda x, w: _tr(_dot(_t(w), x, 1, 1)),
}
INPUT_GRAD = {  # dY [M, out], W [in, out] -> [M, in]
    "dY @ W^T": lambda g, w: _dot(g, w, 1, 1),
    "(W @ dY^T)^T": lambda g, w: _tr(_dot(w, g, 1, 1)),
    "dY @ copy(W^T)": lambda g, w: _dot(g, _t(w), 1, 0),
    "(copy(W^T)^T @ dY^T)^T": lambda g, w: _tr(_dot(_t(w), g, 0, 1)),
}
WEIGHT_GRAD = {  # X [M, in], dY [M, out] -> [in, out]
    "X^T @ dY": lambda x, g: _dot(x, g, 0, 0),
    "(dY^T @ X)^T": lambda x, g: _tr(_dot(g, x, 0, 0)),
    "copy(X^T) @ dY": lambda x, g: _dot(_t(x), g, 1, 0),
    "copy(X^T) @ copy(dY^T)^T": lambda x, g: _dot(_t(x), _t(g), 1, 1),
    "(copy(dY^T) @ X)^T": lambda x, g: _tr(_dot(_t(g), x, 1, 0)),
}
# The tied head: h [M, d], E [vocab, d]; logits = h @ E^T.
HEAD_FORWARD = {
    "h @ E^T": lambda h, e: _dot(h, e, 1, 1),
    "(E @ h^T)^T": lambda h, e: _tr(_dot(e, h, 1, 1)),
    "h @ copy(E^T)": lambda h, e: _dot(h, _t(e), 1, 0),
}
HEAD_INPUT_GRAD = {  # dL [M, vocab] -> dh = dL @ E [M, d]
    "dL @ E": lambda g, e: _dot(g, e, 1, 0),
    "(E^T @ dL^T)^T": lambda g, e: _tr(_dot(e, g, 0, 1)),
    "dL @ copy(E^T)^T": lambda g, e: _dot(g, _t(e), 1, 1),
}
HEAD_WEIGHT_GRAD = {  # dE = dL^T @ h [vocab, d]
    "dL^T @ h": lambda g, h: _dot(g, h, 0, 0),
    "(h^T @ dL)^T": lambda g, h: _tr(_dot(h, g, 0, 0)),
    "copy(dL^T) @ h": lambda g, h: _dot(_t(g), h, 1, 0),
    "(copy(h^T) @ dL)^T": lambda g, h: _tr(_dot(_t(h), g, 1, 0)),
}


def _ready(fn, *args):
    return fn(*args).block_until_ready()


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _cases(rng):
    def r(*shape):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    for name, (k, n) in DENSE.items():
        x, w, g = r(M, k), r(k, n), r(M, n)
        flops = 2 * M * k * n
        yield name, "forward", FORWARD, (x, w), lambda a, b: a @ b, flops
        yield name, "input_grad", INPUT_GRAD, (g, w), lambda a, b: a @ b.T, flops
        yield name, "weight_grad", WEIGHT_GRAD, (x, g), lambda a, b: a.T @ b, flops
    h, e, g = r(M, D), r(VOCAB, D), r(M, VOCAB)
    flops = 2 * M * D * VOCAB
    yield "lm_head", "forward", HEAD_FORWARD, (h, e), lambda a, b: a @ b.T, flops
    yield "lm_head", "input_grad", HEAD_INPUT_GRAD, (g, e), lambda a, b: a @ b, flops
    yield "lm_head", "weight_grad", HEAD_WEIGHT_GRAD, (g, h), lambda a, b: a.T @ b, flops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", action="append", help="products to run (default: all)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for name, kind, arrangements, operands, torch_fn, flops in _cases(rng):
        if args.only and name not in args.only:
            continue
        a, b = (jnp.asarray(o) for o in operands)
        ta, tb = (torch.from_numpy(o) for o in operands)
        expected = np.asarray(torch_fn(ta, tb))
        rows = {"torch.mm": _median_ms(functools.partial(torch_fn, ta, tb), args.repeats)}
        for label, fn in arrangements.items():
            run = jax.jit(fn)
            got = np.asarray(run(a, b))
            assert np.allclose(got, expected, atol=1e-4), (name, kind, label)
            rows[label] = _median_ms(functools.partial(_ready, run, a, b), args.repeats)
        for label, ms in rows.items():
            line = {"product": name, "kind": kind, "arrangement": label, "ms": round(ms, 2)}
            print(json.dumps(line | {"gflops": round(flops / ms / 1e6, 1)}), flush=True)


if __name__ == "__main__":
    main()
