"""PEPLER's setting on a PETER/PEPLER `reviews.pickle` dataset you supply (e.g. Amazon Movies & TV).

    research train --config experiments/configs/pepler_reviews.py --workdir runs/pepler \
        --config.data.path=/data/TripAdvisor/reviews.pickle --config.data.index_dir=/data/TripAdvisor/1 \
        --config.init.decoder=/path/to/gpt2
    research evaluate --workdir runs/pepler --split test

As in PEPLER (Li et al., 2023): the template sentence as target cut to 20 GPT-2 tokens, user
and item id prompts, batch 128, AdamW at 1e-3, two stages (prompt only until the validation
loss stops improving, then everything), greedy decoding of 20 tokens. `reviews.pickle` is read
with a restricted unpickler that refuses anything but plain containers and scalars.
"""

from research.config import default_config


def get_config():
    cfg = default_config()
    cfg.data.source = "pepler"
    cfg.data.path = "reviews.pickle"  # set --config.data.path and --config.data.index_dir
    cfg.data.index_dir = "1"
    cfg.data.target = "template"
    cfg.data.max_target_tokens = 20
    cfg.data.encoder_input = "none"
    cfg.data.target_buckets = (22,)
    cfg.model.conditioning = "id_prompt"
    cfg.init.encoder = ""
    cfg.train.batch_size = 128
    cfg.train.learning_rate = 1e-3
    cfg.train.schedule = "constant"
    cfg.train.warmup_steps = 0
    cfg.train.weight_decay = 0.01
    cfg.train.two_stage = True
    cfg.train.stage1_trainable = ("conditioning",)
    cfg.train.trainable = ("decoder", "conditioning")
    cfg.train.stage1_max_steps = 20000
    cfg.train.stage1_patience = 1
    cfg.train.steps = 40000
    cfg.train.eval_every = 1000
    cfg.train.checkpoint_every = 1000
    cfg.sampling.strategy = "greedy"
    cfg.sampling.max_new_tokens = 20
    cfg.sampling.batch_size = 256
    return cfg
