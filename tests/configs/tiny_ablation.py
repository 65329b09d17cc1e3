"""A tiny ablation for the tests: 2 methods x 2 seeds of the tiny run, evaluated on 6 test examples.

research ablate --config tests/configs/tiny_ablation.py --workdir /tmp/tiny_ablation
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("tiny", Path(__file__).with_name("tiny.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config():
    cfg = _tiny.get_config()
    cfg.train.steps = 4
    cfg.model.rating_head = "mf"  # RMSE/MAE beside the text metrics in every table
    cfg.train.rating_weight = 1.0
    cfg.train.tensorboard = False
    cfg.eval.max_examples = 6  # fewer than the test split holds
    cfg.sampling.batch_size = 8
    cfg.sampling.max_new_tokens = 8
    return cfg


def get_grid():
    return {"axes": {"model.conditioning": ["none", "id_prompt"]}, "seeds": [0, 1]}
