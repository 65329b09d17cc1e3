"""What the host CPU offers for matrix products, read from ``/proc/cpuinfo`` (Linux x86).

Which kernels XLA and PyTorch can use depends on these features: without bfloat16 arithmetic
(``avx512_bf16``, AMX) XLA:CPU's bfloat16 products are slower than its float32 ones
(experiments/bench/README.md, the Zen 3 run), so bfloat16 decoding weights do not pay there.
"""

from __future__ import annotations

import functools
import platform

# The features that decide which matrix kernels can run; research bench records those present.
MATRIX_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
BFLOAT16_ARITHMETIC = ("avx512_bf16", "amx_bf16")


def parse_cpuinfo(text: str) -> tuple[str | None, list[str] | None]:
    """``/proc/cpuinfo``'s text -> (the first CPU's model name, its MATRIX_FEATURES present);
    the features are None when the text has no x86 ``flags`` line (another architecture)."""
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
    features = None if flags is None else [name for name in MATRIX_FEATURES if name in flags]
    return model, features


@functools.cache
def host_cpu() -> tuple[str, list[str] | None]:
    """This machine's CPU model and matrix features (None: unknown, e.g. not Linux x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            model, features = parse_cpuinfo(f.read())
    except OSError:
        model, features = None, None
    return model or platform.processor() or platform.machine(), features


def lacks_bfloat16_arithmetic() -> bool:
    """True only when the CPU's features are known and include no bfloat16 arithmetic."""
    features = host_cpu()[1]
    return features is not None and not any(f in features for f in BFLOAT16_ARITHMETIC)
