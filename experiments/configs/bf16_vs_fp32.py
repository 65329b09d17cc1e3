"""bfloat16 compute against float32: a small plain GPT-2 trained from scratch on the synthetic
corpus, once per ``model.dtype`` (same seed, same batches, float32 parameters in both).

    research train --config experiments/configs/bf16_vs_fp32.py --workdir runs/bf16_vs_fp32/float32
    research train --config experiments/configs/bf16_vs_fp32.py --workdir runs/bf16_vs_fp32/bfloat16 \
        --config.model.dtype=bfloat16

Results, figures and their reading: experiments/results/bf16_vs_fp32/.
"""

from research.config import default_config


def get_config():
    cfg = default_config()
    cfg.model.conditioning = "none"  # the decoder alone: the comparison is its arithmetic
    cfg.data.encoder_input = "none"
    cfg.data.target_buckets = (22,)  # one compiled shape
    cfg.model.decoder.update(n_layer=4, n_embd=256, n_head=4)
    cfg.train.steps = 300
    cfg.train.batch_size = 16
    cfg.train.learning_rate = 1e-3
    cfg.train.warmup_steps = 30
    cfg.train.eval_every = 50
    cfg.train.max_eval_batches = 4
    cfg.train.checkpoint_every = 300
    cfg.train.log_every = 10
    return cfg
