"""A Llama decoder end to end: its folder's tokenizer and conventions, the data, training
under every conditioning method, decoding against transformers' ``generate``, the quickstart.

The decoder is ``write_tiny_llama``'s (tests/conftest.py): random weights and a small
byte-level BPE with Llama's specials (``<s>`` BOS, ``</s>`` EOS, no pad token).
"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import optax
import pytest
import torch
import transformers

from research import cli, sampling
from research.config import load_config
from research.data import tokenizers
from research.data.pipeline import cache_key, load_dataset
from research.models.build import build_generator
from research.models.generator import GROUPS, Generator, GeneratorSpec, init_generator
from research.train.optim import make_optimizer, trainable_labels
from research.train.steps import init_state, make_train_step, replicate, shard
from tests.conftest import (
    TINY_ENCODER,
    TINY_LLAMA,
    conditioning_batch,
    generate_pair,
    incremental_and_full,
    left_padded_prompts,
    random_generator,
    randomise_,
    write_tiny_roberta,
)
from tests.conftest import torch_generate as reference_generate

TINY = "tests/configs/tiny.py"
# The tiny BPE spends 13-16 tokens on a synthetic review (GPT-2: 10-11).
LLAMA_TARGETS = (("data.max_target_tokens", "18"), ("data.target_buckets", "(20,)"))


def test_tokenizer_from_the_folder_pads_with_eos(tiny_llama_torch_and_folder):
    """Llama has no pad token: EOS pads (masks keep it out of attention and loss)."""
    reference, folder = tiny_llama_torch_and_folder
    tok = tokenizers.decoder_tokenizer(folder)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "</s>")
    assert (tok.bos_token_id, tok.eos_token_id) == (
        reference.config.bos_token_id,
        reference.config.eos_token_id,
    )
    assert len(tok) == reference.config.vocab_size


def test_targets_use_the_decoders_tokenizer_and_pad_id(tiny_llama_torch_and_folder):
    """``init.decoder=FOLDER`` makes the data use that folder's tokenizer: rows are
    BOS + tokens + EOS in its ids, batches pad with its pad id, the cache key follows it."""
    _, folder = tiny_llama_torch_and_folder
    cfg = load_config(TINY, [("init.decoder", str(folder)), *LLAMA_TARGETS])
    assert cfg.data.decoder_tokenizer == str(folder)
    dataset = load_dataset(cfg.data)
    tok = dataset.decoder_tokenizer
    split = dataset.splits["train"]
    row = split.decoder[0]
    assert row[0] == tok.bos_token_id == 1 and row[-1] == tok.eos_token_id == 2
    expected = tok(split.target_texts[0], add_special_tokens=False)["input_ids"]
    assert row[1:-1].tolist() == expected[: cfg.data.max_target_tokens]
    batch = next(iter(dataset.eval_iterator("train", 8)))
    assert (batch["decoder_ids"][batch["decoder_mask"] == 0] == tok.pad_token_id).all()
    assert (batch["decoder_mask"] == 0).any()
    gpt2 = tokenizers.decoder_tokenizer(None)
    encoder = tokenizers.encoder_tokenizer(None)
    files = []
    assert cache_key(cfg.data, files, (tok, encoder)) != cache_key(cfg.data, files, (gpt2, encoder))


def test_gpt2_folders_without_tokenizer_files_keep_the_packaged_bpe(tiny_gpt2_folder):
    tok = tokenizers.decoder_tokenizer(tiny_gpt2_folder)
    assert tok.pad_token_id == tok.eos_token_id == tok.bos_token_id == 50256
    assert np.array_equal(
        tok("hello")["input_ids"], tokenizers.gpt2_tokenizer()("hello")["input_ids"]
    )


# --- Decoding against transformers' generate ------------------------------------------------

# An EOS id this random model (seed 1) emits early in two of the six rows only.
LLAMA_EOS = 286
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """(PyTorch LlamaForCausalLM with GQA, our Generator around it, its params)."""
    config = transformers.LlamaConfig(
        **TINY_LLAMA, vocab_size=300, bos_token_id=1, eos_token_id=LLAMA_EOS
    )
    torch.manual_seed(0)
    torch_model = randomise_(transformers.LlamaForCausalLM(config), seed=1)
    torch_model.generation_config.pad_token_id = LLAMA_EOS
    return generate_pair(torch_model, tmp_path_factory.mktemp("tiny_llama_eos"))


@pytest.fixture(scope="module")
def prompts() -> dict[str, np.ndarray]:
    return left_padded_prompts(LLAMA_EOS)


def torch_generate(torch_model, prompts, **kwargs) -> np.ndarray:
    return reference_generate(torch_model, prompts, NEW_TOKENS, LLAMA_EOS, **kwargs)


@pytest.mark.parametrize(
    "strategy, settings",
    [("greedy", {}), ("beam", {"num_beams": 3, "length_penalty": 1.0})],
)
def test_gqa_decoding_matches_transformers_generate(llama_pair, prompts, strategy, settings):
    """Greedy and beam search from our GQA KV cache give transformers' tokens, EOS included."""
    torch_model, model, params = llama_pair
    expected = torch_generate(torch_model, prompts, **settings)
    cfg = sampling.SamplingConfig(
        strategy=strategy, max_new_tokens=NEW_TOKENS, batch_size=8, **settings
    )
    ours = sampling.generate(model, params, prompts, cfg)  # sharded over the 4 devices
    np.testing.assert_array_equal(ours, expected)
    lengths = sampling.output_lengths(ours, LLAMA_EOS)
    assert (lengths < NEW_TOKENS).any() and (lengths == NEW_TOKENS).any()


@pytest.mark.parametrize("strategy, settings", [("greedy", {}), ("beam", {"num_beams": 3})])
def test_decoding_after_a_soft_prefix_matches_transformers_generate(
    llama_pair, prompts, strategy, settings
):
    """id_prompt puts two vectors before the left-padded prompt: our tokens equal
    transformers' ``generate(inputs_embeds=prefix + token embeddings)``, whose positions also
    follow the mask, so the rotary angles after the prefix are checked while decoding."""
    torch_model, plain, plain_params = llama_pair
    spec = GeneratorSpec(plain.spec.decoder, None, ("id_prompt",), num_users=6, num_items=6)
    model = Generator(spec)
    params = init_generator(model, jax.random.key(0), {"decoder": plain_params["decoder"]})
    batch = {**prompts, "user": np.arange(6, dtype=np.int32), "item": np.arange(6, dtype=np.int32)}
    inputs = jax.jit(functools.partial(model.apply, method=Generator.condition))(
        {"params": params}, {"user": batch["user"], "item": batch["item"]}
    )
    prefix = torch.as_tensor(np.array(inputs.prefix_embeds))
    with torch.no_grad():
        embeds = torch_model.model.embed_tokens(torch.as_tensor(prompts["prompt_ids"]).long())
        mask = np.concatenate([np.ones((6, 2), np.int32), prompts["prompt_mask"]], axis=1)
        out = torch_model.generate(
            inputs_embeds=torch.cat([prefix, embeds], dim=1),
            attention_mask=torch.as_tensor(mask).long(),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            **settings,
        ).numpy()
    expected = np.pad(out, ((0, 0), (0, NEW_TOKENS - out.shape[1])), constant_values=LLAMA_EOS)
    cfg = sampling.SamplingConfig(
        strategy=strategy, max_new_tokens=NEW_TOKENS, batch_size=8, **settings
    )
    ours = sampling.generate(model, params, batch, cfg)
    np.testing.assert_array_equal(ours, expected)
    assert not np.array_equal(ours, torch_generate(torch_model, prompts, **settings))


def test_sampling_is_seeded_and_top_k_1_is_greedy(llama_pair, prompts):
    torch_model, model, params = llama_pair

    def sample(**kwargs):
        cfg = sampling.SamplingConfig(
            strategy="sample", max_new_tokens=NEW_TOKENS, batch_size=8, **kwargs
        )
        return sampling.generate(model, params, prompts, cfg)

    first = sample(seed=3)
    np.testing.assert_array_equal(first, sample(seed=3))
    assert not np.array_equal(first, sample(seed=4))
    np.testing.assert_array_equal(sample(top_k=1), torch_generate(torch_model, prompts))


# --- Every conditioning method on a Llama decoder ------------------------------------------

ENCODER = TINY_ENCODER
# Every hook at once (offset, cross-attention, two prefixes) costs one compilation, not four.
ALL_METHODS = "prefix+cross_attention+additive+id_prompt"


@pytest.mark.parametrize("conditioning", ["cross_attention+additive", "prefix+id_prompt"])
def test_incremental_decoding_equals_full_forward(conditioning, llama_pair):
    """Prefill (soft prefix, left-padded prompt) then one token per step == the full forward:
    the rotary positions after a prefix and the GQA cache agree with the whole-sequence pass."""
    model, params = random_generator(llama_pair[1].spec.decoder, ENCODER, conditioning)
    batch = conditioning_batch(ENCODER.vocab_size, 3)
    incremental, full, _, _ = incremental_and_full(model, params, batch, 280, LLAMA_EOS)
    assert np.max(np.abs(incremental - full)) < 1e-4


def test_every_conditioning_method_trains_a_llama(tiny_llama_torch_and_folder):
    """Three steps of the real train step from the pretrained tiny Llama: the loss falls and
    every group moves (decoder, encoder, conditioning), every method's parameters included,
    and the rating head that reads the Llama's final hidden state."""
    reference, folder = tiny_llama_torch_and_folder
    overrides = [
        ("init.decoder", str(folder)),
        ("model.conditioning", ALL_METHODS),
        ("model.rating_head", "decoder"),
    ]
    cfg = load_config(TINY, [*overrides, *LLAMA_TARGETS])
    dataset = load_dataset(cfg.data)
    model, params = build_generator(
        cfg, dataset.num_users, dataset.num_items, jax.random.key(0), dataset.rating_mean
    )
    assert "rating" in params
    embed = params["decoder"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(embed, reference.model.embed_tokens.weight.detach().numpy())
    schedule = optax.constant_schedule(1e-3)
    tx = make_optimizer(params, GROUPS, schedule)
    train_step = make_train_step(model, tx, trainable_labels(params, GROUPS), schedule)
    state, key = replicate(init_state(params, tx), 1), replicate(jax.random.key(0), 1)
    batch = shard(next(iter(dataset.train_iterator(8, seed=0))), 1, 1)
    losses = []
    for _ in range(3):
        state, metrics = train_step(state, batch, key)
        losses.append(float(metrics["loss"][0]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    trained = jax.tree.map(lambda x: np.asarray(x[0]), state["params"])
    for group in params:
        moved = jax.tree.map(
            lambda a, b: float(np.max(np.abs(a - b))), trained[group], params[group]
        )
        assert max(jax.tree.leaves(moved)) > 0, group


def test_quickstart_runs_on_a_llama_folder(tiny_llama_torch_and_folder, tmp_path, capsys):
    """``research train`` + ``research evaluate`` of the quickstart with
    ``--config.init.decoder=<tiny llama folder>`` (a few steps, one shape per side)."""
    _, folder = tiny_llama_torch_and_folder
    workdir = str(tmp_path / "run")
    small = [
        f"--config.init.decoder={folder}",
        "--config.train.steps=2",
        "--config.train.batch_size=8",
        "--config.train.eval_every=2",
        "--config.train.checkpoint_every=2",
        "--config.train.eval_batch_size=8",
        "--config.train.max_eval_batches=1",
        "--config.train.tensorboard=false",
        "--config.data.synthetic.num_reviews=120",
        "--config.data.max_target_tokens=18",
        "--config.data.target_buckets=(20,)",
        "--config.data.max_encoder_tokens=32",
        "--config.data.encoder_buckets=(32,)",
    ]
    config = "experiments/configs/quickstart.py"
    assert cli.main(["train", "--config", config, "--workdir", workdir, *small]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["data"]["decoder_tokenizer"] == str(folder)
    evaluate = ["--config.eval.max_examples=8", "--config.sampling.max_new_tokens=4"]
    assert cli.main(["evaluate", "--workdir", workdir, "--split", "test", *evaluate]) == 0
    samples = (tmp_path / "run" / "eval" / "test" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 8


def test_a_roberta_folder_is_the_encoder(tiny_llama_torch_and_folder, tmp_path):
    """``init.encoder=FOLDER`` (RoBERTa) brings its weights and its tokenizer: encoder rows
    are ``<s> ... </s>`` in its ids, padded with its pad id 1, under a Llama decoder."""
    reference = write_tiny_roberta(tmp_path / "roberta")
    _, llama_folder = tiny_llama_torch_and_folder
    overrides = [
        ("init.decoder", str(llama_folder)),
        ("init.encoder", str(tmp_path / "roberta")),
        ("model.conditioning", "prefix"),
        ("data.encoder_input", "features"),  # short rows: padding shows
        *LLAMA_TARGETS,
    ]
    cfg = load_config(TINY, overrides)
    assert cfg.data.encoder_tokenizer == str(tmp_path / "roberta")
    dataset = load_dataset(cfg.data)
    batch = next(iter(dataset.eval_iterator("train", 8)))
    ids, mask = batch["encoder_ids"], batch["encoder_mask"]
    lengths = mask.sum(1)
    assert (ids[:, 0] == 0).all() and (ids[np.arange(8), lengths - 1] == 2).all()
    assert (ids[mask == 0] == 1).all() and (mask == 0).any()
    model, params = build_generator(cfg, dataset.num_users, dataset.num_items, jax.random.key(0))
    word_embeddings = params["encoder"]["embeddings"]["word_embeddings"]["embedding"]
    np.testing.assert_array_equal(
        word_embeddings, reference.embeddings.word_embeddings.weight.detach().numpy()
    )
    logits = jax.jit(model.apply)({"params": params}, batch)
    assert logits.shape == (*batch["decoder_ids"].shape, dataset.decoder_tokenizer.vocab_size)
    assert np.isfinite(logits).all()
