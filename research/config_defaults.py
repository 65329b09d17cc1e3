"""The default experiment config: every key, with its default value and what it means.

A config file (``experiments/configs/NAME.py``) starts from :func:`default_config` and changes
what the experiment needs; ``research.config`` loads it, applies command-line overrides and
validates it against these keys.
"""

from __future__ import annotations

import ml_collections

from research.data.config import data_config
from research.models import conditioning
from research.sampling import sampling_config


def default_config() -> ml_collections.ConfigDict:
    """Every setting with its default: a small GPT-2 from scratch, MiniLM encoder, prefix."""
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    cfg.data = data_config()

    cfg.model = ml_collections.ConfigDict()
    # One of research.models.conditioning.valid_conditionings(), e.g. "prefix+id_prompt".
    cfg.model.conditioning = "prefix"
    # Every registered method's hyperparameters (prefix_length, pooling, ...), with defaults.
    for name, hp in conditioning.hyperparameters().items():
        cfg.model[name] = hp.default
    # Rating prediction beside the review: one of research.models.rating.HEADS. The MLP heads
    # have rating_layers sigmoid layers of rating_hidden_size (PEPLER's MLP: 3 of 400).
    cfg.model.rating_head = "none"
    cfg.model.rating_hidden_size = 400
    cfg.model.rating_layers = 3
    cfg.model.dtype = "float32"  # compute dtype; parameters stay float32
    cfg.model.attention_impl = ""  # "" lets JAX choose; "cudnn" for fused GPU attention
    # LoRA adapters (research/models/lora.py); rank 0 = none. Empty targets = each family's
    # attention q/k/v/o. Train them alone with train.trainable=("lora",).
    cfg.model.lora = ml_collections.ConfigDict(
        {"rank": 0, "alpha": 16.0, "dropout": 0.0, "targets": (), "parts": ("decoder",)}
    )
    # Architectures used when init.decoder / init.encoder are empty (trained from scratch).
    cfg.model.decoder = ml_collections.ConfigDict(
        {
            "model_type": "gpt2",  # a decoder family of research/models/families.py
            "vocab_size": 50257,
            "n_positions": 64,
            "n_embd": 128,
            "n_layer": 2,
            "n_head": 4,
            "resid_pdrop": 0.1,
            "embd_pdrop": 0.1,
            "attn_pdrop": 0.1,
        }
    )
    cfg.model.encoder = ml_collections.ConfigDict(
        {
            "model_type": "bert",  # an encoder family
            "vocab_size": 30522,
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 512,
            "max_position_embeddings": 512,
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
        }
    )

    # Hugging Face folders to start from. encoder "minilm" = all-MiniLM-L6-v2 from its package.
    cfg.init = ml_collections.ConfigDict({"decoder": "", "encoder": "minilm"})

    cfg.train = ml_collections.ConfigDict()
    cfg.train.steps = 1000
    cfg.train.batch_size = 32  # global batch, over all devices and accumulation steps
    cfg.train.accum_steps = 1
    # Objective: text_weight * mean token loss + rating_weight * mean squared rating error
    # (PEPLER's text_reg and rating_reg; PEPLER's default rating_reg is 0.01, 1.0 for its MLP).
    cfg.train.text_weight = 1.0
    cfg.train.rating_weight = 0.01
    cfg.train.learning_rate = 1e-3
    cfg.train.warmup_steps = 50
    cfg.train.schedule = "cosine"
    cfg.train.end_lr_fraction = 0.0
    cfg.train.weight_decay = 0.01
    cfg.train.clip_norm = 1.0
    cfg.train.trainable = ("encoder", "decoder", "conditioning")
    # dtype of the frozen base (decoder/encoder weights that train in no stage, e.g. under
    # LoRA): "bfloat16" halves their memory; adapters, conditioning, optimizer stay float32.
    cfg.train.frozen_dtype = "float32"
    # PEPLER's schedule: first only stage1_trainable, until validation loss stops improving
    # for `patience` evaluations or `stage1_max_steps` steps, then train.trainable.
    cfg.train.two_stage = False
    cfg.train.stage1_trainable = ("conditioning",)
    cfg.train.stage1_max_steps = 500
    cfg.train.stage1_patience = 2
    cfg.train.eval_every = 200
    cfg.train.eval_batch_size = 64
    cfg.train.max_eval_batches = 0  # 0 = the whole validation split; else a seeded sample
    cfg.train.log_every = 10
    cfg.train.checkpoint_every = 200
    cfg.train.keep_checkpoints = 2
    cfg.train.tensorboard = True

    cfg.sampling = sampling_config()

    cfg.eval = ml_collections.ConfigDict()
    cfg.eval.split = "test"
    cfg.eval.max_examples = 0  # 0 = all
    # max_examples and train.max_eval_batches take a sample drawn with this seed across the
    # whole split: the same examples for every method and run (research.data.splits).
    cfg.eval.subset_seed = 0
    cfg.eval.checkpoint = "best"  # best | latest

    # Caches shared by runs. "" = under the user's cache directory (research/compilation_cache.py),
    # "off" = none. compilation_dir: JAX's persistent compilation cache; features_dir: a frozen
    # encoder's outputs, computed once (research/train/feature_cache.py), stored as features_dtype.
    cfg.cache = ml_collections.ConfigDict(
        {"compilation_dir": "", "features_dir": "", "features_dtype": "float32"}
    )

    # Multi-host: empty / -1 means "from the environment" (SLURM, TPU) or single process.
    cfg.distributed = ml_collections.ConfigDict(
        {"coordinator_address": "", "num_processes": 0, "process_id": -1}
    )
    return cfg
