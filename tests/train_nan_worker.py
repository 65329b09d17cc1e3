"""``train()`` with a loss, or only a gradient, that is NaN (for tests/test_train.py).

    python -m tests.train_nan_worker {loss|gradient} CONFIG WORKDIR [--config.KEY=VALUE ...]

Replaces ``research.train.steps.token_loss_sums`` before the train step is built. ``loss``: the
loss is NaN. ``gradient``: the loss is unchanged but its gradient is NaN (as when a backward
pass overflows). ``train`` must raise ``TrainingDiverged`` naming the step; the traceback ends
the process with exit code 1.
"""

from __future__ import annotations

import sys

import jax.numpy as jnp

from research.config import load_config, split_overrides
from research.train import steps
from research.train.loop import train

real_token_loss_sums = steps.token_loss_sums


def nan_loss(logits, decoder_ids, decoder_mask):
    total, count = real_token_loss_sums(logits, decoder_ids, decoder_mask)
    return total * jnp.nan, count


def nan_gradient(logits, decoder_ids, decoder_mask):
    total, count = real_token_loss_sums(logits, decoder_ids, decoder_mask)
    # sqrt(0) adds 0 to the loss, but its derivative is infinite: the chain rule gives 0 * inf.
    return total + jnp.sqrt(0.0 * logits[0, 0, 0]), count


def main(argv: list[str]) -> None:
    rest, overrides = split_overrides(argv)
    mode, config, workdir = rest
    steps.token_loss_sums = {"loss": nan_loss, "gradient": nan_gradient}[mode]
    train(load_config(config, overrides), workdir)


if __name__ == "__main__":
    main(sys.argv[1:])
