"""Every conditioning method on the synthetic corpus (3 seeds), frozen MiniLM, small GPT-2.

    research ablate --config experiments/configs/ablation_synthetic.py --workdir runs/ablation_synthetic

The synthetic corpus (research/data/synthetic.py) makes each review a function of the user's
aspect preferences and the item's aspect qualities, both visible in their other reviews: a
method that conditions well should beat `none` clearly on BLEU/ROUGE and FMR.
"""

from research.config import default_config
from research.models.conditioning import METHODS


def get_config():
    cfg = default_config()
    cfg.data.encoder_input = "user_item_history"
    cfg.data.target_buckets = (22,)
    cfg.data.encoder_buckets = (128,)
    cfg.train.trainable = ("decoder", "conditioning")
    cfg.train.steps = 400
    cfg.train.learning_rate = 2e-3
    cfg.train.eval_every = 100
    cfg.train.checkpoint_every = 100
    cfg.train.max_eval_batches = 4
    return cfg


def get_grid():
    return {"axes": {"model.conditioning": list(METHODS)}, "seeds": [0, 1, 2]}
