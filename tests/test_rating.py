"""Rating heads and the two-part objective, against closed forms and second code paths.

* The train step's update equals the gradient of the objective written out on the whole global
  batch (``text_weight`` x mean token loss + ``rating_weight`` x mean squared error), on 1 device,
  4 devices and 4 devices x 2 accumulation steps, with uneven token counts, unrated and
  padding rows (SGD with learning rate 1, so the update is the gradient).
* ``mf`` under ``id_prompt`` is the dot product of the prompt's own table rows (no table of its
  own); the ``decoder`` head never reads a target token; every head builds and trains with every
  conditioning method; rating parameters are conditioning parameters, so stage 1 trains them.
* On the synthetic corpus (ratings = 3 + the item's qualities on the user's two aspects), each
  head beats predicting the training mean on held-out reviews, and the ``decoder`` head under
  ``none`` conditioning, which reads nothing about the user or item, does not.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from research.config import load_config
from research.data.pipeline import load_dataset
from research.eval.pepler_compat import rating_errors
from research.models import conditioning as cond
from research.models.bert import BertConfig
from research.models.build import build_generator
from research.models.generator import GROUPS, Generator, GeneratorSpec, init_generator, param_group
from research.models.gpt2 import GPT2Config
from research.models.rating import HEADS, RatingHeadSpec
from research.train.loss import mean_token_loss
from research.train.optim import make_optimizer, trainable_labels
from research.train.steps import init_state, make_train_step, replicate, shard
from tests.conftest import initial_shapes

TINY_CONFIG = "tests/configs/tiny.py"
VOCAB, BOS = 24, 0
DECODER = GPT2Config(
    vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=BOS,
    eos_token_id=BOS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
)  # fmt: skip
ENCODER = BertConfig(
    vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)  # fmt: skip
NUM_IDS = 6
PREDICTING_HEADS = [name for name in HEADS if name != "none"]


def make_model(head: str, conditioning: str = "id_prompt", offset: float = 3.0) -> Generator:
    return Generator(
        GeneratorSpec(
            decoder=DECODER,
            encoder=ENCODER,
            conditioning=cond.parse_conditioning(conditioning),
            options={"prefix_length": 2},
            num_users=NUM_IDS,
            num_items=NUM_IDS,
            rating=RatingHeadSpec(head, hidden_size=8, layers=2, offset=offset),
        )
    )


def random_batch(seed: int, size: int = 8, length: int = 6) -> dict[str, np.ndarray]:
    """Rows of uneven lengths (one all padding), ratings 1..5, some rows without a rating."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (size, length)).astype(np.int32)
    ids[:, 0] = BOS
    lengths = rng.integers(2, length + 1, size)
    lengths[-1] = 0  # a padding row
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    rated = (rng.random(size) < 0.75) & (lengths > 0)
    encoder_ids = rng.integers(1, VOCAB, (size, 5)).astype(np.int32)
    return {
        "decoder_ids": ids,
        "decoder_mask": mask,
        "encoder_ids": encoder_ids,
        "encoder_mask": np.ones_like(encoder_ids),
        "user": rng.integers(1, NUM_IDS, size).astype(np.int32),
        "item": rng.integers(1, NUM_IDS, size).astype(np.int32),
        "rating": np.where(rated, rng.integers(1, 6, size), 0).astype(np.float32),
        "rating_mask": rated.astype(np.int32),
    }


def objective_on_whole_batch(model, params, batch, text_weight, rating_weight):
    """The objective written out directly: means over the whole batch, no sums or counts."""
    logits, rating = model.apply({"params": params}, batch, method="logits_and_rating")
    text = mean_token_loss(logits, batch["decoder_ids"], batch["decoder_mask"])
    rated = batch["rating_mask"] > 0
    mse = jnp.sum(jnp.where(rated, (rating - batch["rating"]) ** 2, 0.0)) / rated.sum()
    return text_weight * text + rating_weight * mse, (text, mse)


def one_sgd_step(model, params, batch, devices: int, accum: int, weights):
    tx = optax.sgd(1.0)
    labels = trainable_labels(params, GROUPS)
    step = make_train_step(
        model, tx, labels, optax.constant_schedule(1.0), **weights, deterministic=True
    )
    state = replicate(init_state(params, tx), devices)
    key = replicate(jax.random.key(0), devices)
    new_state, metrics = step(state, shard(batch, devices, accum), key)
    new_params = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), new_state["params"])
    gradient = jax.tree_util.tree_map(lambda old, new: old - new, params, new_params)
    return gradient, {k: float(v[0]) for k, v in metrics.items()}


@pytest.mark.parametrize("head", ["mf", "decoder"])
def test_step_gradient_is_the_whole_batch_objective_on_any_device_split(head):
    model = make_model(head)
    params = init_generator(model, jax.random.key(0))
    batch = random_batch(0)
    weights = {"text_weight": 0.7, "rating_weight": 0.3}
    (_, (text, mse)), expected = jax.value_and_grad(
        objective_on_whole_batch, argnums=1, has_aux=True
    )(model, params, batch, **weights)
    for devices, accum in ((1, 1), (4, 1), (4, 2)):
        gradient, metrics = one_sgd_step(model, params, batch, devices, accum, weights)
        where = f"{devices} devices x {accum} accumulation steps"
        assert metrics["loss"] == pytest.approx(float(text), rel=1e-5), where
        assert metrics["rating_mse"] == pytest.approx(float(mse), rel=1e-5), where
        assert metrics["rated"] == batch["rating_mask"].sum(), where
        flat_expected = traverse_util.flatten_dict(expected)
        for path, value in traverse_util.flatten_dict(gradient).items():
            np.testing.assert_allclose(
                value, flat_expected[path], rtol=1e-4, atol=1e-6, err_msg=f"{where}: {path}"
            )


def test_without_a_head_the_step_is_the_text_loss_alone():
    model = make_model("none")
    params = init_generator(model, jax.random.key(0))
    batch = random_batch(1)
    expected = jax.grad(
        lambda p: mean_token_loss(model.apply({"params": p}, batch), *_targets(batch))
    )(params)
    gradient, metrics = one_sgd_step(model, params, batch, 4, 2, {"rating_weight": 5.0})
    assert "rating_mse" not in metrics
    flat_expected = traverse_util.flatten_dict(expected)
    for path, value in traverse_util.flatten_dict(gradient).items():
        np.testing.assert_allclose(value, flat_expected[path], rtol=1e-4, atol=1e-6)


def _targets(batch):
    return batch["decoder_ids"], batch["decoder_mask"]


def test_mf_with_id_prompt_is_the_dot_product_of_the_prompt_tables():
    model = make_model("mf", "id_prompt", offset=3.5)
    params = init_generator(model, jax.random.key(1))
    assert "rating" not in params  # no table of its own
    batch = random_batch(2)
    tables = params["conditioning_id_prompt"]
    user = np.asarray(tables["user"]["embedding"])[batch["user"]]
    item = np.asarray(tables["item"]["embedding"])[batch["item"]]
    rating = model.apply({"params": params}, batch, method="predict_rating")
    np.testing.assert_allclose(rating, 3.5 + (user * item).sum(-1), rtol=1e-6)
    # The rating loss trains the prompt's tables.
    grads = jax.grad(
        lambda p: objective_on_whole_batch(model, p, batch, text_weight=0.0, rating_weight=1.0)[0]
    )(params)
    assert np.abs(grads["conditioning_id_prompt"]["user"]["embedding"]).sum() > 0


@pytest.mark.parametrize("head", ["mf", "mlp"])
def test_id_heads_own_their_tables_without_id_prompt(head):
    params = initial_shapes(make_model(head, "prefix"))
    assert params["rating"]["user"]["embedding"].shape == (NUM_IDS, DECODER.n_embd)
    assert params["rating"]["item"]["embedding"].shape == (NUM_IDS, DECODER.n_embd)


@pytest.mark.parametrize("conditioning", ["id_prompt", "prefix+cross_attention"])
def test_decoder_head_never_reads_target_tokens(conditioning):
    model = make_model("decoder", conditioning)
    params = init_generator(model, jax.random.key(2))
    batch = random_batch(3)
    other = dict(batch, decoder_ids=random_batch(4)["decoder_ids"])
    other["decoder_ids"][:, 0] = BOS
    other["decoder_mask"] = np.ones_like(batch["decoder_mask"])
    alone = model.apply({"params": params}, batch, method="predict_rating")
    real = batch["decoder_mask"][:, 0] > 0  # a padding row has no BOS to read
    for variant in (batch, other):
        _, rating = model.apply({"params": params}, variant, method="logits_and_rating")
        np.testing.assert_allclose(rating[real], alone[real], rtol=1e-5, atol=1e-6)


def test_rating_parameters_are_conditioning_parameters():
    for head in PREDICTING_HEADS:
        params = initial_shapes(make_model(head, "prefix"))
        paths = [p for p in traverse_util.flatten_dict(params) if p[0] == "rating"]
        assert paths, head
        assert {param_group(p) for p in paths} == {"conditioning"}, head


def test_stage_one_trains_the_head_and_freezes_the_decoder():
    """PEPLER's first stage (train.stage1_trainable = conditioning): the head learns."""
    model = make_model("mlp", "prefix")
    params = init_generator(model, jax.random.key(0))
    tx = optax.sgd(0.1)
    labels = trainable_labels(params, ("conditioning",))
    step = make_train_step(model, tx, labels, optax.constant_schedule(0.1), rating_weight=1.0)
    state, _ = step(replicate(init_state(params, tx), 1), shard(random_batch(5), 1, 1),
                    replicate(jax.random.key(0), 1))  # fmt: skip
    after = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: x[0], state["params"]))
    for path, value in traverse_util.flatten_dict(params).items():
        same = np.array_equal(np.asarray(value), np.asarray(after[path]))
        if path[0] == "rating" and path[-1] == "kernel":
            assert not same, path
        if param_group(path) != "conditioning":
            assert same, path


COMBINATIONS = [
    (head, conditioning)
    for head in PREDICTING_HEADS
    for conditioning in (
        "none",
        "prefix",
        "cross_attention",
        "additive",
        "id_prompt",
        "prefix+id_prompt",
    )  # fmt: skip
]


@pytest.mark.parametrize(("head", "conditioning"), COMBINATIONS)
def test_every_head_builds_and_trains_with_every_conditioning(head, conditioning):
    """One plain gradient step (eager, no compilation) on the rating loss lowers it."""
    model = make_model(head, conditioning)
    params = init_generator(model, jax.random.key(0))
    batch = random_batch(6)

    def rating_loss(p):
        return objective_on_whole_batch(model, p, batch, text_weight=0.0, rating_weight=1.0)[0]

    before, grads = jax.value_and_grad(rating_loss)(params)
    rating_grads = [g for path, g in traverse_util.flatten_dict(grads).items()
                    if path[0] == "rating" or "id_prompt" in path[0]]  # fmt: skip
    assert rating_grads and all(np.isfinite(g).all() for g in rating_grads)
    assert any(np.abs(g).sum() > 0 for g in rating_grads)
    stepped = jax.tree_util.tree_map(lambda p, g: p - 1e-2 * g, params, grads)
    assert rating_loss(stepped) < before


def test_an_encoder_head_under_id_conditioning_builds_the_encoder_from_the_config():
    """The encoder head alone makes the config's model have an encoder (``model.encoder``)."""
    cfg = load_config(Path(__file__).parents[1] / TINY_CONFIG, [("model.rating_head", "encoder")])
    assert not cond.needs_encoder(cond.parse_conditioning(cfg.model.conditioning))
    model, _ = build_generator(cfg, num_users=4, num_items=4, rating_mean=3.0)
    assert model.spec.encoder == BertConfig.from_dict(
        {k: v for k, v in cfg.model.encoder.items() if k != "model_type"}, source="model.encoder"
    )


# ---------------------------------------------------------------------------------------------
# The synthetic corpus: ratings follow the user's aspects and the item's qualities.


@pytest.fixture(scope="module")
def corpus():
    """The pipeline's batches of a small synthetic corpus, ids renumbered into tiny vocabularies.

    Renumbering (a bijection on the ids that occur) keeps every batch as the pipeline made it
    while the models' embedding and output layers shrink from 50257 / 30522 rows to a few dozen.
    """
    cfg = load_config(Path(__file__).parents[1] / TINY_CONFIG)
    cfg.data.synthetic.update(num_users=24, num_items=24, num_reviews=480)
    dataset = load_dataset(cfg.data)
    splits = dataset.splits.values()
    decoder_vocab = np.unique(np.concatenate([s.decoder.values for s in splits]))
    encoder_vocab = np.unique(np.concatenate([[0], *(s.encoder.values for s in splits)]))

    def renumbered(batch):
        batch = dict(batch)
        batch["decoder_ids"] = np.searchsorted(decoder_vocab, batch["decoder_ids"]).astype(np.int32)
        batch["encoder_ids"] = np.searchsorted(encoder_vocab, batch["encoder_ids"]).astype(np.int32)
        return batch

    eos = int(np.searchsorted(decoder_vocab, dataset.decoder_tokenizer.eos_token_id))
    decoder = GPT2Config(
        vocab_size=len(decoder_vocab), n_positions=32, n_embd=32, n_layer=1, n_head=2,
        bos_token_id=eos, eos_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    encoder = BertConfig(
        vocab_size=len(encoder_vocab), hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return dataset, renumbered, decoder, encoder


def held_out_rmse(corpus, head: str, conditioning: str, steps: int = 150) -> tuple[float, float]:
    """(RMSE of the trained head, RMSE of the training mean) on validation + test."""
    dataset, renumbered, decoder, encoder = corpus
    spec = GeneratorSpec(
        decoder=decoder,
        encoder=encoder,
        conditioning=cond.parse_conditioning(conditioning),
        options={"prefix_length": 2},
        num_users=dataset.num_users,
        num_items=dataset.num_items,
        rating=RatingHeadSpec(head, hidden_size=32, layers=1, offset=dataset.rating_mean),
    )
    model = Generator(spec)
    params = init_generator(model, jax.random.key(0))
    schedule = optax.constant_schedule(3e-3)
    tx = make_optimizer(params, GROUPS, schedule, weight_decay=0.0)
    step = make_train_step(
        model, tx, trainable_labels(params, GROUPS), schedule, rating_weight=1.0,
        deterministic=True, donate=False,
    )  # fmt: skip
    state = replicate(init_state(params, tx), 1)
    key = replicate(jax.random.key(0), 1)
    batches = dataset.train_iterator(32, seed=0)
    for _ in range(steps):
        batch = {k: v for k, v in renumbered(next(batches)).items() if k != "example"}
        state, _ = step(state, shard(batch, 1, 1), key)
    params = jax.tree_util.tree_map(lambda x: x[0], state["params"])
    predict = jax.jit(lambda p, b: model.apply({"params": p}, b, method="predict_rating"))
    true, predicted = [], []
    for split in ("validation", "test"):
        for batch in dataset.eval_iterator(split, 32):
            real = batch["example"] >= 0
            inputs = {k: v for k, v in renumbered(batch).items() if k not in ("example", "rating")}
            predicted.append(np.asarray(predict(params, inputs))[real])
            true.append(batch["rating"][real])
    true, predicted = np.concatenate(true), np.concatenate(predicted)
    low, high = dataset.rating_range
    mean = np.full_like(true, dataset.rating_mean)
    return rating_errors(true, predicted, low, high)["rmse"], rating_errors(true, mean, low, high)[
        "rmse"
    ]


@pytest.mark.parametrize(
    ("head", "conditioning"),
    [("mf", "id_prompt"), ("mlp", "none"), ("encoder", "none"), ("decoder", "id_prompt")],
)
def test_each_head_beats_the_training_mean_on_held_out_reviews(corpus, head, conditioning):
    rmse, baseline = held_out_rmse(corpus, head, conditioning)
    print(f"{head} under {conditioning}: held-out RMSE {rmse:.3f}, training mean {baseline:.3f}")
    assert rmse < 0.9 * baseline


def test_a_head_that_reads_nothing_does_not_beat_the_training_mean(corpus):
    """The decoder head under ``none`` conditioning sees the same BOS state for everyone."""
    rmse, baseline = held_out_rmse(corpus, "decoder", "none")
    print(f"decoder under none: held-out RMSE {rmse:.3f}, training mean {baseline:.3f}")
    assert rmse > 0.98 * baseline
