"""LoRA adapters (Hu et al. 2021) on the linear layers of a decoder or encoder family.

A targeted layer ``y = x W + b`` becomes ``y = x W + b + (alpha / rank) * dropout(x) A B`` with
``A`` ``[in, rank]`` and ``B`` ``[rank, out]``. ``B`` starts at zero, so at step 0 the model is
exactly the base model.

The adapters are added without touching the family modules: while the generator runs its
decoder (or encoder) it installs :func:`adapters`, a Flax method interceptor that, for every
``nn.Dense`` whose path ends in one of the target patterns, creates ``lora_a``/``lora_b`` next
to that layer's ``kernel`` (``decoder/h_0/attn/c_attn/lora_a``) and adds their product to the
layer's output. The parameters form their own group, ``lora`` (``research/models/generator.py``),
that the freezing regimes know. :func:`merge` folds them into the kernels, giving a tree of
the base model's shape (what ``research export`` writes).

Targets are regular expressions matched against whole trailing components of a layer's path
(``attn/c_attn`` matches ``decoder/h_3/attn/c_attn``, not ``crossattention/c_attn``); by
default a family's ``lora_targets`` (its attention q/k/v/o projections).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

PARTS = ("decoder", "encoder")
ADAPTER_NAMES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """``model.lora``: rank 0 means no adapters."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    # Regexes of layer paths; empty = each part's family defaults (``lora_targets``).
    targets: tuple[str, ...] = ()
    parts: tuple[str, ...] = ("decoder",)

    @classmethod
    def from_config(cls, raw: Any) -> LoRAConfig:
        """Validated ``model.lora`` (a mapping); errors name the key."""
        raw = dict(raw)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ValueError(f"model.lora.{unknown[0]} does not exist; valid keys: {names}")
        rank, alpha, dropout = raw.get("rank", 0), raw.get("alpha", 16.0), raw.get("dropout", 0.0)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ValueError(f"model.lora.rank={rank!r} must be an int >= 0 (0 = no adapters)")
        if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
            raise ValueError(f"model.lora.alpha={alpha!r} must be a number > 0")
        if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
            raise ValueError(f"model.lora.dropout={dropout!r} must be in [0, 1)")
        targets = tuple(raw.get("targets", ()))
        for pattern in targets:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise ValueError(f"model.lora.targets: {pattern!r} is no regex ({err})") from err
        parts = tuple(raw.get("parts", ("decoder",)))
        bad = sorted(set(parts) - set(PARTS))
        if bad or not parts:
            raise ValueError(
                f"model.lora.parts={list(parts)!r}: choose a non-empty subset of {list(PARTS)}"
            )
        return cls(rank, float(alpha), float(dropout), targets, parts)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def targets_for(self, family: Any) -> tuple[str, ...]:
        """The patterns a part of ``family`` gets: as configured, else the family's."""
        return self.targets or family.lora_targets


def matches(path: tuple[str, ...], targets: tuple[str, ...]) -> bool:
    """Whether a layer path ends in whole components matching one of ``targets``."""
    joined = "/".join(path)
    return any(re.search(f"(^|/)(?:{t})$", joined) for t in targets)


@contextlib.contextmanager
def adapters(
    lora: LoRAConfig | None, targets: tuple[str, ...], deterministic: bool = True
) -> Iterator[None]:
    """While active, targeted ``nn.Dense`` layers carry (and create, at init) LoRA adapters.

    Dropout on the adapter input draws from the ``dropout`` rng when not ``deterministic``.
    """
    if lora is None or lora.rank == 0 or not targets:
        yield
        return

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not (
            isinstance(module, nn.Dense)
            and context.method_name == "__call__"
            and matches(module.path, targets)
        ):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        a = module.param(
            "lora_a", nn.initializers.he_uniform(), (x.shape[-1], lora.rank), jnp.float32
        )
        b = module.param("lora_b", nn.initializers.zeros, (lora.rank, module.features), jnp.float32)
        if not deterministic and lora.dropout > 0:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1 - lora.dropout, x.shape)
            x = jnp.where(keep, x / (1 - lora.dropout), 0)
        dtype = module.dtype or y.dtype
        update = (x.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype)
        return y + (lora.scale * update).astype(y.dtype)

    with nn.intercept_methods(intercept):
        yield


def has_adapters(params: dict[str, Any]) -> bool:
    return any(path[-1] in ADAPTER_NAMES for path in traverse_util.flatten_dict(params))


def merge(params: dict[str, Any], lora: LoRAConfig | None) -> dict[str, Any]:
    """``params`` with every adapter folded into its layer's kernel (``W + scale * A B``, in
    float32 even over a bfloat16 base) and the ``lora_a``/``lora_b`` leaves removed: the base
    model's tree."""
    flat = traverse_util.flatten_dict(params)
    out = {p: v for p, v in flat.items() if p[-1] not in ADAPTER_NAMES}
    for path, a in flat.items():
        if path[-1] != "lora_a":
            continue
        layer = path[:-1]
        b = flat[(*layer, "lora_b")]
        kernel = out[(*layer, "kernel")]
        delta = lora.scale * (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32))
        out[(*layer, "kernel")] = jnp.asarray(kernel, jnp.float32) + delta
    return traverse_util.unflatten_dict(out)
