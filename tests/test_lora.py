"""LoRA adapters: step 0 is the base model, only adapters train, merging folds them in.

References: the same generator built without ``lora`` (a second code path sharing no adapter
code), the parameters before training (bitwise), one device against four.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from research import config as config_lib
from research.config import load_config
from research.eval.evaluate import load_run
from research.export import export_run, load_export
from research.models import lora as lora_lib
from research.models.bert import BertConfig
from research.models.decoder_inputs import DecoderInputs
from research.models.generator import (
    Generator,
    GeneratorSpec,
    init_generator,
    param_group,
    part_trains,
)
from research.models.gpt2 import GPT2Config
from research.models.llama_config import LlamaConfig
from research.train.loop import train
from research.train.optim import learning_rate_schedule, make_optimizer, trainable_labels
from research.train.steps import init_state, make_train_step, replicate, shard

from .conftest import TINY_GPT2, TINY_LLAMA, apply_model

VOCAB = 1000
TINY_BERT = BertConfig(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)  # fmt: skip
DECODERS = {
    "gpt2": GPT2Config(**TINY_GPT2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": LlamaConfig.from_dict({**TINY_LLAMA, "vocab_size": VOCAB}),
}
LORA = lora_lib.LoRAConfig(rank=4, alpha=8.0, parts=("decoder", "encoder"))


def _spec(decoder: str, with_encoder: bool, lora=LORA) -> GeneratorSpec:
    return GeneratorSpec(
        decoder=DECODERS[decoder],
        encoder=TINY_BERT if with_encoder else None,
        # cross-attention: decoder sublayers that are not LoRA targets by default
        conditioning=("prefix", "cross_attention") if with_encoder else ("none",),
        lora=lora,
    )


def _batch(rows: int = 4, seq: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (rows, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, -3:] = 0  # some padding
    return {
        "decoder_ids": ids,
        "decoder_mask": mask,
        "encoder_ids": ids[:, ::-1].copy(),
        "encoder_mask": mask,
        "user": np.zeros(rows, np.int32),
        "item": np.zeros(rows, np.int32),
    }


def _without_adapters(params):
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {p: v for p, v in flat.items() if p[-1] not in lora_lib.ADAPTER_NAMES}
    )


def _logits(spec, params, batch):
    return np.asarray(apply_model(Generator(spec), params, batch))


CASES = [("gpt2", False), ("llama", False), ("gpt2", True)]
IDS = ["gpt2", "llama", "gpt2+bert"]


@pytest.mark.parametrize(("decoder", "with_encoder"), CASES, ids=IDS)
def test_step_zero_is_the_base_model(decoder, with_encoder):
    spec = _spec(decoder, with_encoder)
    params = init_generator(Generator(spec), jax.random.key(0))
    base = _without_adapters(params)
    batch = _batch()
    want = _logits(_spec(decoder, with_encoder, lora=None), base, batch)
    # B = 0 adds exact zeros; only XLA's fusion of the larger graph may round differently.
    np.testing.assert_allclose(_logits(spec, params, batch), want, rtol=0, atol=1e-6)
    # The adapters sit on attention q/k/v/o of the decoder (and encoder), nowhere else.
    layers = sorted(
        "/".join(p[:-1]) for p in traverse_util.flatten_dict(params) if p[-1] == "lora_a"
    )
    if decoder == "gpt2":
        want_layers = [f"decoder/h_{i}/attn/{n}" for i in range(2) for n in ("c_attn", "c_proj")]
    else:
        want_layers = [f"decoder/layers_{i}/self_attn/{n}_proj" for i in range(2) for n in "koqv"]
    if with_encoder:
        want_layers += [
            f"encoder/encoder/layer_{i}/attention/{n}"
            for i in range(2)
            for n in ("output/dense", "self/key", "self/query", "self/value")
        ]
    assert layers == sorted(want_layers)
    assert {param_group(p) for p in traverse_util.flatten_dict(params) if "lora_b" in p} == {"lora"}


def _randomised_adapters(params, seed=1):
    """Non-zero B (and A) so the adapters change the output."""
    flat = traverse_util.flatten_dict(params)
    keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
    return traverse_util.unflatten_dict(
        {
            p: 0.1 * jax.random.normal(next(keys), v.shape) if p[-1] == "lora_b" else v
            for p, v in flat.items()
        }
    )


@pytest.mark.parametrize(("decoder", "with_encoder"), CASES, ids=IDS)
def test_merged_weights_give_the_unmerged_logits(decoder, with_encoder):
    spec = _spec(decoder, with_encoder)
    params = _randomised_adapters(init_generator(Generator(spec), jax.random.key(0)))
    batch = _batch()
    unmerged = _logits(spec, params, batch)
    base_spec = _spec(decoder, with_encoder, lora=None)
    merged = lora_lib.merge(params, spec.lora)
    assert jax.tree.structure(merged) == jax.tree.structure(_without_adapters(params))
    np.testing.assert_allclose(_logits(base_spec, merged, batch), unmerged, atol=1e-4)
    # ...and the adapters do change the model (else the comparison proves nothing).
    assert np.abs(_logits(base_spec, _without_adapters(params), batch) - unmerged).max() > 1e-2


def _train(spec, params, trainable, devices, steps=2):
    schedule = learning_rate_schedule(0.05, steps, 0, "constant")
    tx = make_optimizer(params, trainable, schedule, clip_norm=None)
    model = Generator(spec)
    step = make_train_step(
        model, tx, trainable_labels(params, trainable), schedule, deterministic=True, donate=False
    )
    state = replicate(init_state(params, tx), devices)
    seed = replicate(jax.random.key(3), devices)
    losses = []
    for i in range(steps):
        batch = shard(_batch(seed=i), devices, accum_steps=1)
        state, metrics = step(state, batch, seed)
        losses.append(float(metrics["loss"][0]))
    return jax.tree.map(lambda x: np.asarray(x[0]), state["params"]), losses


def test_training_lora_changes_only_the_adapters_bitwise():
    spec = _spec("gpt2", True)
    params = init_generator(Generator(spec), jax.random.key(0))
    trained, _ = _train(spec, params, ("lora",), devices=1)
    before, after = traverse_util.flatten_dict(params), traverse_util.flatten_dict(trained)
    for path, value in before.items():
        if param_group(path) == "lora" and path[-1] == "lora_b":
            assert np.abs(after[path] - np.asarray(value)).max() > 0, path
        elif param_group(path) != "lora":
            np.testing.assert_array_equal(after[path], np.asarray(value), err_msg=str(path))


def test_one_device_trains_as_four():
    spec = _spec("llama", False)
    params = init_generator(Generator(spec), jax.random.key(0))
    one, loss_one = _train(spec, params, ("lora",), devices=1)
    four, loss_four = _train(spec, params, ("lora",), devices=4)
    np.testing.assert_allclose(loss_four, loss_one, rtol=1e-5)
    # Adam moves each parameter by about the learning rate (0.05) whatever its gradient's size,
    # so a gradient summed in another order (one device's rows vs four devices' all-reduce)
    # moves it by up to lr x the gradient's relative rounding error: up to 1.03e-5 on an
    # AVX2-only AMD EPYC (Zen 3), under 1e-5 on the AVX-512 VMs. Tolerance: lr x 1e-3.
    for path, value in traverse_util.flatten_dict(one).items():
        np.testing.assert_allclose(
            traverse_util.flatten_dict(four)[path], value, atol=5e-5, err_msg=str(path)
        )


def test_adapter_dropout_draws_from_the_dropout_rng():
    spec = _spec("gpt2", False, lora_lib.LoRAConfig(rank=2, dropout=0.5))
    params = _randomised_adapters(init_generator(Generator(spec), jax.random.key(0)))
    batch = _batch()

    def run(seed):
        return Generator(spec).apply(
            {"params": params}, batch, deterministic=False, rngs={"dropout": jax.random.key(seed)}
        )

    np.testing.assert_array_equal(run(0), run(0))
    assert jnp.abs(run(0) - run(1)).max() > 0
    assert jnp.abs(run(0) - Generator(spec).apply({"params": params}, batch)).max() > 0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.lora.rank", -1, "model.lora.rank=-1 must be an int >= 0"),
        ("model.lora.alpha", 0.0, "model.lora.alpha=0.0 must be a number > 0"),
        ("model.lora.dropout", 1.0, "model.lora.dropout=1.0 must be in [0, 1)"),
        ("model.lora.parts", ("head",), "choose a non-empty subset of ['decoder', 'encoder']"),
        ("model.lora.targets", ("attn/(",), "model.lora.targets: 'attn/(' is no regex"),
        ("train.trainable", ("lora",), "train.trainable has 'lora', but model.lora.rank=0"),
        ("train.trainable", ("adapters",), "'conditioning', 'lora']"),
    ],
)
def test_bad_lora_config_names_the_key(key, value, message):
    cfg = config_lib.default_config()
    section, name = key.rsplit(".", 1)
    config_lib.get(cfg, section)[name] = value
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(cfg)
    assert message in str(err.value)


def test_targets_match_whole_trailing_path_components():
    targets = ("attn/c_attn",)
    assert lora_lib.matches(("decoder", "h_3", "attn", "c_attn"), targets)
    assert not lora_lib.matches(("decoder", "h_3", "crossattention", "c_attn"), targets)
    assert not lora_lib.matches(("decoder", "h_3", "attn", "c_attn2"), targets)


def test_adapters_on_the_encoder_make_it_train():
    """A frozen encoder's features are cached (and it runs without dropout); one whose adapters
    train is not frozen."""
    adapted = _spec("gpt2", True)
    decoder_only = _spec("gpt2", True, lora_lib.LoRAConfig(rank=4))
    assert part_trains(adapted, "encoder", ("lora",))
    assert not part_trains(decoder_only, "encoder", ("lora",))
    assert not part_trains(adapted, "encoder", ("conditioning",))
    assert part_trains(decoder_only, "encoder", ("encoder",))


TINY_RUN = Path(__file__).parent / "configs" / "tiny.py"
LORA_RUN = (
    ("model.lora.rank", "4"),
    ("train.trainable", "('lora', 'conditioning')"),
    ("train.steps", "2"),
    ("train.warmup_steps", "0"),
    ("train.schedule", "constant"),
    ("train.learning_rate", "0.05"),  # big steps: the adapters move well away from zero
    ("train.eval_every", "2"),
    ("train.checkpoint_every", "2"),
    ("train.tensorboard", "false"),
)


def test_export_writes_merged_weights_transformers_reads(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "export"
    train(load_config(TINY_RUN, LORA_RUN), workdir)
    run = load_run(workdir)
    assert np.abs(np.asarray(run.params["decoder"]["h_0"]["attn"]["c_attn"]["lora_b"])).max() > 0
    export_run(workdir, out)
    ids = np.asarray(next(iter(run.dataset.eval_iterator("test", 8)))["decoder_ids"])
    ours = run.model.apply(
        {"params": run.params}, ids, np.ones_like(ids), DecoderInputs(), method=Generator.decode
    )
    reference = transformers.GPT2LMHeadModel.from_pretrained(out / "decoder").eval()
    with torch.no_grad():
        theirs = reference(input_ids=torch.as_tensor(ids).long()).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)
    # The export alone restores the run: its config has no adapters left to build.
    restored = load_export(out)
    assert restored.model.spec.lora is None
    assert tuple(restored.cfg.train.trainable) == ("conditioning", "decoder")
    batch = {k: v for k, v in next(iter(run.dataset.eval_iterator("test", 8))).items()}
    batch = {k: batch[k] for k in ("decoder_ids", "decoder_mask", *run.model.spec.batch_keys)}
    np.testing.assert_allclose(
        np.asarray(restored.model.apply({"params": restored.params}, batch)),
        np.asarray(run.model.apply({"params": run.params}, batch)),
        atol=1e-4,
        rtol=0,
    )
