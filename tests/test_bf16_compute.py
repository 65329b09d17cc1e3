"""bfloat16 compute (``model.dtype=bfloat16``, float32 parameters) for GPT-2 and Llama.

Two references: the program itself (which products run in bfloat16, which steps stay
float32: research/models/precision.py states the policy) and transformers' PyTorch models
under ``torch.autocast("cpu", bfloat16)``, whose rounding error against their own float32
run ours must match in size. The end-to-end test trains, evaluates and samples through the
config key against the same run in float32.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from research.bench.common import subjaxprs
from research.config import load_config
from research.eval.evaluate import evaluate_run
from research.models import hf
from research.models.gpt2 import GPT2Config
from research.models.llama_config import LlamaConfig
from research.train.loop import train
from research.train.loss import mean_token_loss
from research.train.run_log import read_metrics
from tests.conftest import (
    TINY_ENCODER,
    TINY_GPT2,
    TINY_LLAMA,
    conditioning_batch,
    mask_positions,
    random_generator,
    randomise_,
    torch_lm_logits,
    valid_diff,
)

DECODERS = {
    "gpt2": GPT2Config(**TINY_GPT2),
    "llama_tied": LlamaConfig(vocab_size=1000, tie_word_embeddings=True, **TINY_LLAMA),
    "llama_untied": LlamaConfig(vocab_size=1000, **TINY_LLAMA),
}
# Steps that must see float32 inputs: norm statistics (rsqrt), the softmax's max and exp
# (attention and the loss's logsumexp), the loss's log.
FLOAT32_OPS = ("rsqrt", "reduce_max", "exp", "log")


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in subjaxprs(eqn.params):
            yield from _equations(sub)


def _operand_dtypes(eqn) -> tuple[str, ...]:
    return tuple(str(v.aval.dtype) for v in eqn.invars if hasattr(v, "aval"))


def _bf16_loss(name: str):
    """The conditioned generator (BERT encoder, prefix + cross-attention) in bfloat16, its
    loss as a function of the parameters, and the parameters."""
    model, params = random_generator(DECODERS[name], TINY_ENCODER, "prefix+cross_attention")
    model = model.clone(dtype=jnp.bfloat16)
    batch = conditioning_batch(TINY_ENCODER.vocab_size, 2)
    ids = np.random.default_rng(0).integers(0, 999, (2, 8)).astype(np.int32)
    batch |= {"decoder_ids": ids, "decoder_mask": np.ones_like(ids)}

    def loss(p):
        logits = model.apply({"params": p}, batch)
        assert logits.dtype == jnp.float32
        return mean_token_loss(logits, batch["decoder_ids"], batch["decoder_mask"])

    return loss, params


@pytest.mark.parametrize("name", list(DECODERS))
def test_every_product_runs_in_bfloat16_and_norms_softmax_loss_in_float32(name):
    """Forward: every matrix product (the tied LM head included) has bfloat16 operands, and
    FLOAT32_OPS see float32 only. Backward: no product runs on two float32 operands (the
    score products of ``jax.nn.dot_product_attention``'s backward take its float32 score
    gradient and a bfloat16 operand)."""
    loss, params = _bf16_loss(name)
    forward = list(_equations(jax.make_jaxpr(loss)(params).jaxpr))
    products = [e for e in forward if e.primitive.name == "dot_general"]
    assert products and all(_operand_dtypes(e) == ("bfloat16",) * 2 for e in products)
    precise = [e for e in forward if e.primitive.name in FLOAT32_OPS]
    assert {e.primitive.name for e in precise} == set(FLOAT32_OPS)
    assert all(set(_operand_dtypes(e)) == {"float32"} for e in precise)
    backward = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    for eqn in _equations(backward):
        if eqn.primitive.name == "dot_general":
            assert "bfloat16" in _operand_dtypes(eqn), eqn
    grads = jax.grad(loss)(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))


def _torch_autocast_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(
            input_ids=torch.as_tensor(ids).long(),
            attention_mask=torch.as_tensor(mask).long(),
            position_ids=torch.as_tensor(mask_positions(mask)).long(),
        )
    return out.logits.float().numpy()


TORCH_MODELS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_GPT2)),
    "llama_tied": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=1000, tie_word_embeddings=True, **TINY_LLAMA)
    ),
}
# Max abs logit difference, logits up to ~4.3 (measured on three batches: ours bf16 vs ours
# float32 0.032-0.051, PyTorch autocast vs its float32 0.027-0.042, ours bf16 vs PyTorch
# autocast 0.034-0.043). bfloat16 keeps 8 bits of mantissa: 2^-8 of 4 is 0.016 per rounding.
BF16_LOGIT_TOL = 0.1
# Our mean abs error against float32 may exceed autocast's by this factor at most (measured
# 0.9-1.2); computing norms or softmax in bfloat16 makes it several times larger.
BF16_ERROR_RATIO = 1.6


@pytest.mark.parametrize("name", list(TORCH_MODELS))
def test_bfloat16_logits_match_pytorch_autocast(name, tmp_path):
    torch.manual_seed(0)
    reference = randomise_(TORCH_MODELS[name](), 0)
    reference.save_pretrained(tmp_path)
    full, params = hf.load_pretrained(tmp_path)
    half, _ = hf.load_pretrained(tmp_path, dtype=jnp.bfloat16)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, 999, (4, 12))
        mask = (np.arange(12)[None] < np.array([[12], [8], [5], [12]])).astype(np.int32)
        ours = np.asarray(half.apply({"params": params}, ids, mask))
        ours_full = np.asarray(full.apply({"params": params}, ids, mask))
        theirs = _torch_autocast_logits(reference, ids, mask)
        theirs_full = torch_lm_logits(reference, mask, input_ids=ids)
        assert valid_diff(ours, theirs, mask) < BF16_LOGIT_TOL
        assert valid_diff(ours, ours_full, mask) < BF16_LOGIT_TOL
        rows = mask.astype(bool)
        ours_error = np.abs(ours - ours_full)[rows].mean()
        their_error = np.abs(theirs - theirs_full)[rows].mean()
        assert ours_error < BF16_ERROR_RATIO * their_error, (ours_error, their_error)


TINY = "tests/configs/tiny.py"
NO_DROPOUT = (
    ("model.decoder.resid_pdrop", "0.0"),
    ("model.decoder.embd_pdrop", "0.0"),
    ("model.decoder.attn_pdrop", "0.0"),
)


def _run(tmp_path, dtype: str):
    workdir = tmp_path / dtype
    cfg = load_config(TINY, [("model.dtype", dtype), *NO_DROPOUT])
    train(cfg, workdir, ["test"])
    metrics = evaluate_run(workdir, "test")
    losses = [row["loss"] for row in read_metrics(workdir) if row["split"] == "train"]
    samples = [
        json.loads(line)["generated"]
        for line in (workdir / "eval" / "test" / "samples.jsonl").read_text().splitlines()
    ]
    return np.array(losses), metrics, samples


def test_bfloat16_trains_evaluates_and_samples_like_float32(tmp_path):
    """``model.dtype=bfloat16`` end to end (train, evaluate, greedy-sample) against the same
    run in float32 (dropout off): per-step training losses within 0.1% (measured: at most
    2e-5 relative over the 8 steps), test perplexity within 0.1% (measured 1.3e-4), and most
    generated texts identical (measured 9 of 10; the untrained model's top logits are close,
    so a bfloat16 rounding can flip a greedy choice)."""
    losses16, metrics16, samples16 = _run(tmp_path, "bfloat16")
    losses32, metrics32, samples32 = _run(tmp_path, "float32")
    assert len(losses16) == len(losses32) > 0
    np.testing.assert_allclose(losses16, losses32, rtol=1e-3)
    assert abs(metrics16["perplexity"] / metrics32["perplexity"] - 1) < 1e-3
    assert np.mean([a == b for a, b in zip(samples16, samples32, strict=True)]) >= 0.6
