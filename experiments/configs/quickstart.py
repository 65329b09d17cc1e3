"""Quickstart: a small GPT-2 from scratch conditioned by MiniLM (soft prefix) on the synthetic corpus.

    research train --config experiments/configs/quickstart.py --workdir runs/quickstart
    research evaluate --workdir runs/quickstart --split test

About 3 minutes on a 2-core CPU.
"""

from research.config import default_config


def get_config():
    cfg = default_config()
    cfg.model.conditioning = "prefix"
    cfg.train.trainable = ("decoder", "conditioning")  # MiniLM stays frozen: 3x cheaper steps
    cfg.train.steps = 300
    cfg.train.batch_size = 32
    cfg.train.learning_rate = 1e-3
    cfg.train.eval_every = 100
    cfg.train.checkpoint_every = 100
    cfg.eval.max_examples = 120
    return cfg
