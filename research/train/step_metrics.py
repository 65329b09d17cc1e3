"""Step metrics kept on the devices and fetched at intervals, with the divergence check."""

from __future__ import annotations

import math
import time

import jax

from research.train.checkpoint import Checkpointer


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the message names the step."""


class StepMetrics:
    """Step metrics kept on the devices, fetched in one transfer when the loop needs them.

    Fetching waits until those steps ran, so it happens every ``train.log_every`` steps and
    before a checkpoint is written or the model evaluated, never after every step.
    """

    def __init__(self, checkpoints: Checkpointer, bar):
        self._checkpoints, self._bar = checkpoints, bar
        self._pending: list[tuple[int, dict]] = []
        self._window_tokens, self._window_start = 0.0, time.perf_counter()

    def add(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics))

    def fetch(self) -> dict[str, float] | None:
        """The newest step's metrics as floats; raises at the first non-finite step."""
        if not self._pending:
            return None
        fetched = jax.device_get([metrics for _, metrics in self._pending])
        steps = [step for step, _ in self._pending]
        self._pending.clear()
        for step, metrics in zip(steps, fetched, strict=True):
            row = {k: float(v[0]) for k, v in metrics.items()}
            loss, grad_norm = row["loss"], row["grad_norm"]
            # A NaN gradient under a finite loss (an overflowing backward pass) would have made
            # the parameters NaN (the step left them unchanged): stop on either.
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self._bar.close()
                what = (
                    f"loss is {loss}"
                    if not math.isfinite(loss)
                    else f"gradient norm is {grad_norm} (loss {loss})"
                )
                good = self._checkpoints.latest_step()
                raise TrainingDiverged(
                    f"{what} at step {step}; stopping. The last good checkpoint is "
                    f"step {good} in {self._checkpoints.directory}"
                    if good is not None
                    else f"{what} at step {step}; stopping (no checkpoint yet)"
                )
            self._window_tokens += row["tokens"]
        return row

    def tokens_per_s(self) -> float:
        """Tokens per second since the previous call (the logging window)."""
        now = time.perf_counter()
        rate = self._window_tokens / max(now - self._window_start, 1e-9)
        self._window_tokens, self._window_start = 0.0, now
        return rate
