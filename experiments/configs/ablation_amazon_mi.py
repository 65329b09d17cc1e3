"""Every conditioning method on Amazon Musical Instruments (5-core), MiniLM over user+item histories.

    research ablate --config experiments/configs/ablation_amazon_mi.py --workdir runs/ablation_amazon_mi

Reads ../shared/data/amazon_musical_instruments_5/reviews_Musical_Instruments_5.json.gz (override
with --config.data.path=...). Targets are each review's first sentence, cut to 20 GPT-2 tokens
as in PEPLER. The decoder is a small GPT-2 from scratch; to fine-tune a real one instead give
its Hugging Face folder: --config.init.decoder=/path/to/gpt2 (then model.decoder is ignored).
The file has 7 empty reviews; they are skipped and counted in each run's data_report.json.
"""

from pathlib import Path

from research.config import default_config
from research.models.conditioning import METHODS

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
AMAZON_MI = SHARED / "amazon_musical_instruments_5" / "reviews_Musical_Instruments_5.json.gz"


def get_config():
    cfg = default_config()
    cfg.data.source = "amazon"
    cfg.data.path = str(AMAZON_MI.resolve())
    cfg.data.on_bad_row = "skip"
    cfg.data.target = "first_sentence"
    cfg.data.encoder_input = "user_item_history"
    cfg.data.max_encoder_tokens = 256
    cfg.data.encoder_buckets = (128, 256)
    cfg.model.decoder.n_layer = 4
    cfg.model.decoder.n_embd = 256
    cfg.model.decoder.n_head = 4
    cfg.train.trainable = ("decoder", "conditioning")
    cfg.train.steps = 3000
    cfg.train.batch_size = 64
    cfg.train.learning_rate = 1e-3
    cfg.train.eval_every = 500
    cfg.train.checkpoint_every = 500
    cfg.sampling.batch_size = 128
    return cfg


def get_grid():
    return {"axes": {"model.conditioning": list(METHODS)}, "seeds": [0, 1, 2]}
