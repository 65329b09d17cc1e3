"""Every conditioning method on Amazon Musical Instruments (5-core), MiniLM over user+item histories.

    research train  --config experiments/configs/lm_pretrain_amazon_mi.py --workdir runs/lm_pretrain_amazon_mi
    research ablate --config experiments/configs/ablation_amazon_mi.py --workdir runs/ablation_amazon_mi

Reads ../shared/data/amazon_musical_instruments_5/reviews_Musical_Instruments_5.json.gz (override
with --config.data.path=...). Targets are each review's first sentence, cut to 20 GPT-2 tokens
as in PEPLER. Every run starts its decoder from the domain-pretrained language model of
``lm_pretrain_amazon_mi.py`` (train it first; it reads training-split reviews only), whose
architecture is ``model.decoder`` below. Another start: ``--config.init.decoder=run:DIR`` (a
workdir) or ``--config.init.decoder=/path/to/gpt2`` (a Hugging Face folder). The encoder is frozen,
so its features are computed once and cached. Sized for a 2-core CPU: experiments/README.md has
the measured step times. The file has 7 empty reviews; they are skipped and counted in each
run's data_report.json.
"""

from pathlib import Path

from research.config import default_config
from research.models.conditioning import METHODS

ROOT = Path(__file__).resolve().parents[2]
AMAZON_MI = ROOT / ".." / "shared" / "data" / "amazon_musical_instruments_5"
PRETRAINED = ROOT / "runs" / "lm_pretrain_amazon_mi"


def get_config():
    cfg = default_config()
    cfg.data.source = "amazon"
    cfg.data.path = str((AMAZON_MI / "reviews_Musical_Instruments_5.json.gz").resolve())
    cfg.data.on_bad_row = "skip"
    cfg.data.target = "first_sentence"
    cfg.data.encoder_input = "user_item_history"
    cfg.data.max_encoder_tokens = 256
    # One padded length per side: one compiled train step per run (nearly every batch of 64
    # holds a 20-token first sentence and a history of 256 tokens anyway).
    cfg.data.target_buckets = (22,)
    cfg.data.encoder_buckets = (256,)
    cfg.model.decoder.n_layer = 4
    cfg.model.decoder.n_embd = 256
    cfg.model.decoder.n_head = 4
    cfg.model.decoder.n_positions = 128  # pretraining reads 66 tokens; here prefixes + 22
    cfg.init.decoder = f"run:{PRETRAINED}"
    # Rating from the decoder's state at BOS: it sees only what the method gives the decoder, so
    # `none` predicts one rating for everybody and the RMSE column shows what conditioning buys.
    cfg.model.rating_head = "decoder"
    cfg.train.trainable = ("decoder", "conditioning")
    cfg.train.steps = 80
    cfg.train.batch_size = 64
    cfg.train.learning_rate = 5e-4
    cfg.train.warmup_steps = 10
    cfg.train.eval_every = 40
    cfg.train.checkpoint_every = 40
    cfg.train.max_eval_batches = 4
    cfg.sampling.batch_size = 128
    return cfg


def get_grid():
    methods = [*METHODS, "prefix+id_prompt"]
    return {"axes": {"model.conditioning": methods}, "seeds": [0, 1, 2]}
