"""Encoder-conditioned review generation in JAX/Flax.

A BERT-family encoder reads what we know about a user and an item and conditions a
GPT-2 decoder that writes the user's review. See README.md and experiments/README.md.
"""

__version__ = "0.1.0"
