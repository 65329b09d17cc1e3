"""How far lower-precision decoding weights move the output of a *trained* decoder.

A random-weight GPT-2 has near-uniform next-token distributions, where any rounding flips the
argmax: its agreement says nothing. So the ``generate`` rows measure agreement on a small
decoder trained here in seconds: a byte-level GPT-2 (4 layers, 128 wide, vocabulary = the 256
bytes + EOS) fitted for a few hundred AdamW steps to the synthetic review corpus
(``research/data/synthetic.py``). Its greedy continuations of held-out reviews' first bytes,
with float32 and with the given decoding weights, are compared token by token.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
import optax

from research import sampling
from research.data.synthetic import synthetic_reviews
from research.models.generator import Generator, GeneratorSpec, init_generator
from research.models.gpt2 import GPT2Config
from research.train.loss import mean_token_loss

EOS = 256  # the bytes are 0..255
LENGTH = 64  # bytes per training row (a review is ~50 bytes, EOS-padded)
PROMPT, NEW_TOKENS, ROWS = 12, 40, 64


def _rows(texts: list[str]) -> np.ndarray:
    """Each text's bytes after EOS (as BOS), EOS-padded to ``LENGTH``: ``[len(texts), LENGTH]``."""
    out = np.full((len(texts), LENGTH), EOS, np.int32)
    for row, text in enumerate(texts):
        data = list(text.encode())[: LENGTH - 1]
        out[row, 1 : 1 + len(data)] = data
    return out


@functools.cache
def trained_decoder(steps: int = 300, seed: int = 0) -> tuple[Generator, dict[str, Any], dict]:
    """(model, trained parameters, what was trained: steps, final loss, corpus sizes)."""
    config = GPT2Config(
        vocab_size=EOS + 1, n_positions=128, n_embd=128, n_layer=4, n_head=4,
        bos_token_id=EOS, eos_token_id=EOS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = Generator(GeneratorSpec(config, None))
    reviews = synthetic_reviews(200, 100, 4000, seed, 6)
    train = _rows([r.text for r in reviews[:-ROWS]])
    params = init_generator(model, jax.random.key(seed))
    tx = optax.adamw(3e-3)

    @jax.jit
    def step(params, opt_state, ids):
        def loss(params):
            logits = model.apply({"params": params}, {"decoder_ids": ids, "decoder_mask": mask})
            return mean_token_loss(logits, ids, mask)

        mask = np.ones(ids.shape, np.int32)
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state, rng = tx.init(params), np.random.default_rng(seed)
    for _ in range(steps):
        params, opt_state, value = step(params, opt_state, train[rng.integers(0, len(train), 32)])
    held_out = [r.text for r in reviews[-ROWS:]]
    about = {"steps": steps, "final_loss": float(value), "train_reviews": len(train)}
    return model, params, {**about, "prompts": held_out}


@functools.cache
def greedy_agreement(weights_dtype: str, steps: int = 300) -> dict[str, Any]:
    """Greedy tokens with ``weights_dtype`` decoding weights vs float32 on the decoder trained
    ``steps`` steps: the fraction of equal tokens and of equal rows, with what the decoder is.

    Nothing else enters it, so it is computed once per process: the ``generate`` rows of every
    measurement (GPT-2, Llama, bfloat16 compute) carry the same figures."""
    model, params, about = trained_decoder(steps)
    prompts = _rows(about["prompts"])[:, :PROMPT]
    batch = {
        "example": np.arange(ROWS),
        "prompt_ids": prompts,
        "prompt_mask": np.ones_like(prompts),
    }

    def tokens(dtype: str) -> np.ndarray:
        cfg = sampling.SamplingConfig(
            max_new_tokens=NEW_TOKENS, batch_size=ROWS, weights_dtype=dtype
        )
        return sampling.generate(model, params, batch, cfg, devices=jax.devices()[:1])

    ours, reference = tokens(weights_dtype), tokens("float32")
    return {
        "token_agreement": float((ours == reference).mean()),
        "row_agreement": float((ours == reference).all(1).mean()),
        "model": "byte-level GPT-2 (4 x 128) trained on the synthetic reviews",
        **{k: v for k, v in about.items() if k != "prompts"},
        "rows": ROWS,
        "prompt_bytes": PROMPT,
        "new_tokens": NEW_TOKENS,
    }
