"""A tiny run for the training tests: one compiled shape, a few seconds per run on a CPU.

    research train --config tests/configs/tiny.py --workdir /tmp/tiny

A 1-layer GPT-2 (32 wide) conditioned on user and item embeddings ("id_prompt": no encoder, so
compiling is about twice as fast) on a small synthetic corpus, with one target bucket and one
encoder bucket so that jit sees one shape. The encoder below (1 layer, from scratch) is used by
runs that override ``model.conditioning`` with a method that reads it, e.g. ``prefix``.
"""

from research.config import default_config


def get_config():
    cfg = default_config()
    cfg.model.conditioning = "id_prompt"
    cfg.model.prefix_length = 2
    cfg.model.decoder.update(n_layer=1, n_embd=32, n_head=2, n_positions=32)
    cfg.model.encoder.update(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    cfg.init.encoder = ""  # from scratch: no MiniLM weights to read
    # 80 training examples: 10 batches of 8 per epoch.
    cfg.data.synthetic.update(num_users=16, num_items=16, num_reviews=100)
    cfg.data.max_target_tokens = 12
    cfg.data.max_encoder_tokens = 32
    cfg.data.target_buckets = (14,)  # = max_target_tokens + BOS + EOS: every batch has T = 14
    cfg.data.encoder_buckets = (32,)
    cfg.train.steps = 8
    cfg.train.batch_size = 8
    cfg.train.warmup_steps = 2
    cfg.train.eval_every = 4
    cfg.train.eval_batch_size = 8
    cfg.train.max_eval_batches = 1
    cfg.train.log_every = 1
    cfg.train.checkpoint_every = 4
    cfg.train.keep_checkpoints = 2
    return cfg
