"""Domain pretraining: the Amazon Musical Instruments decoder as a plain language model (`none`).

    research train --config experiments/configs/lm_pretrain_amazon_mi.py --workdir runs/lm_pretrain_amazon_mi

No pretrained GPT-2 weights exist offline, so a decoder from scratch first learns the language of
reviews here; ``ablation_amazon_mi.py`` then starts every method's decoder from this run's best
checkpoint (``init.decoder=run:runs/lm_pretrain_amazon_mi``). The decoder reads each training
review's text (its first ``max_target_tokens`` GPT-2 tokens), not only the first sentence the
ablation predicts.

Only training-split reviews: the data settings are the ablation's own (same file, split ratios,
split seed and entity rule, so the same seeded split) and only ``target`` (which never changes
which records are read), the token cut and the encoder input differ; the training loop draws
batches from the train split alone. Validation reviews only pick the best checkpoint (validation
loss); test reviews are never read. ``tests/test_lm_pretrain_recipe.py`` checks that the train
split of this config is exactly the ablation's train split and shares no review with its
validation or test splits.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "ablation_amazon_mi", Path(__file__).with_name("ablation_amazon_mi.py")
)
_ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ablation)


def get_config():
    cfg = _ablation.get_config()
    cfg.model.conditioning = "none"
    cfg.model.rating_head = "none"  # a language model only; the ablation adds its own head
    cfg.init.decoder = ""  # from scratch: this run *is* the starting point
    cfg.data.target = "review"
    cfg.data.max_target_tokens = 64
    cfg.data.target_buckets = (66,)  # one compiled step; nearly every batch has a 64-token review
    cfg.data.encoder_input = "none"
    cfg.train.trainable = ("decoder",)
    cfg.train.steps = 1000
    cfg.train.batch_size = 32
    cfg.train.learning_rate = 1e-3
    cfg.train.warmup_steps = 100
    cfg.train.eval_every = 250
    cfg.train.checkpoint_every = 250
    cfg.train.max_eval_batches = 8
    return cfg
