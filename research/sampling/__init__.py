"""Fast decoding: prefill once, then one token per step from a preallocated KV cache.

The cache of a batch has one slot per position the decoder will ever see::

    [ soft prefix (P) | prompt, left padded (T) | generated tokens (max_new_tokens) ]

:func:`prefill` runs the conditioning (encoder, prefix, id prompt, cross-attention keys and
values) and the prompt through the model once; :func:`decode_step` feeds one token per row
into the next slot. The decoding loop is a ``lax.while_loop`` that stops as soon as every row
is finished, so a batch costs one prefill plus (longest output) single-token steps.

Strategies (``SamplingConfig.strategy``):

* ``greedy``: argmax; Hugging Face's ``generate(do_sample=False)`` token for token.
* ``sample``: temperature, then top-k, then top-p (Hugging Face's warpers), then a draw.
  Row ``r`` draws step ``t`` with ``fold_in(fold_in(key(seed), example[r]), t)``, so a
  sample depends on the seed and the example only, not on its batch or device.
* ``beam``: Hugging Face's beam search (transformers 5, ``early_stopping=False``): scores are
  summed log-probabilities, a finished hypothesis scores ``sum / new_tokens ** length_penalty``
  and the best finished one is returned.

All strategies share Hugging Face's hard constraints: no EOS before ``min_new_tokens`` and
``no_repeat_ngram_size`` (an n-gram of the prompt's real tokens plus the output never repeats).
A row ends at its EOS; the slots after it hold the pad id (= EOS, GPT-2's convention).

:func:`generate_batches` shards batches over local devices (``shard_map``: each device runs its
own loop, so one slow row holds back only its device), pads a short last batch and drops the
padding rows. The compiled function is cached per (model, settings, devices) and jit reuses
it for every batch of the same shapes.

One module per job: :mod:`.settings` (``SamplingConfig``), :mod:`.steps` (prefill and single
steps), :mod:`.processors` (logit constraints and warpers), :mod:`.search` (the greedy/sample
and beam loops), :mod:`.runner` (batches over devices). Decoding reads the decoder's weights
as ``research/models/decode_weights.py`` prepares them (output-major kernels in
``sampling.weights_dtype``), once per ``generate`` call or once per loaded model
(:func:`decoding_weights`).
"""

from research.models.decode_weights import DecodeWeights
from research.sampling.processors import constrain, repeated_ngram_mask, warp
from research.sampling.runner import (
    Generated,
    decoding_weights,
    generate,
    generate_batches,
    generate_for_split,
    output_lengths,
)
from research.sampling.settings import SAMPLING_CHOICES, SamplingConfig, sampling_config
from research.sampling.steps import DecodeState, decode_step, prefill

__all__ = [
    "SAMPLING_CHOICES",
    "DecodeState",
    "DecodeWeights",
    "Generated",
    "SamplingConfig",
    "constrain",
    "decode_step",
    "decoding_weights",
    "generate",
    "generate_batches",
    "generate_for_split",
    "output_lengths",
    "prefill",
    "repeated_ngram_mask",
    "sampling_config",
    "warp",
]
