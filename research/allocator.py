"""Two settings of glibc's malloc for XLA:CPU's training: transparent huge pages, so the train
step's temporaries are not faulted in 4 KiB at a time on every step, and a trim after
compilation, so the memory compiling the step freed is not held through training.

XLA:CPU allocates the train step's temporaries (gigabytes for GPT-2 124M) with ``malloc`` and
frees them at the end of every step; glibc hands such large blocks back to the kernel, so the
next step takes a page fault for every 4 KiB page again (536k minor faults per step, measured
in experiments/bench/README.md). With glibc's tunable ``glibc.malloc.hugetlb=1`` malloc asks
for transparent huge pages (``madvise``) for its blocks, and one fault brings in 2 MiB. Memory
is still handed back as before, so the peak does not grow (keeping freed memory in the process
instead, with ``mallopt``, also stopped the faults but raised the peak by 4 GiB).

glibc reads its tunables only when a process starts, so the ``research`` command, started
without the tunable, starts itself again at once with it added to ``GLIBC_TUNABLES`` (before
anything is imported or allocated); processes it starts inherit it (``research bench`` does
not restart: see research/cli.py). Nothing changes where the user already set
``glibc.malloc.hugetlb``, on C libraries other than glibc 2.35+, or where the kernel's
transparent huge pages are off.

Compiling GPT-2 124M's train step frees hundreds of MiB of small allocations, which glibc keeps
in its heap; the step's temporaries are large blocks, fresh ``mmap``s that never reuse them, so
the process's peak carried them (experiments/bench/README.md, memory).
:func:`trim_heap` (glibc's ``malloc_trim(0)``) hands them back; the train steps call it once
compiled, before their first run (``research.train.steps.compile_ahead``). A no-op on other C
libraries.

``RESEARCH_MALLOC`` names the settings that are on, comma-separated: ``hugepages,trim`` when
unset; ``default`` for neither (glibc as it is).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Mapping

from research.errors import ExpectedError

ENV = "RESEARCH_MALLOC"
HUGEPAGES, TRIM, DEFAULT = "hugepages", "trim", "default"
SETTINGS = (HUGEPAGES, TRIM)  # all on unless RESEARCH_MALLOC says otherwise
TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"  # "always [madvise] never"


def settings(environ: Mapping[str, str]) -> frozenset[str]:
    """The settings ``RESEARCH_MALLOC`` turns on (all of :data:`SETTINGS` when it is unset)."""
    value = environ.get(ENV)
    if value is None:
        return frozenset(SETTINGS)
    if value == DEFAULT:
        return frozenset()
    chosen = value.split(",")
    if not set(chosen) <= set(SETTINGS):
        raise ExpectedError(
            f"{ENV}={value!r} in the environment: valid choices are {DEFAULT!r} or a "
            f"comma-separated list of {list(SETTINGS)}"
        )
    return frozenset(chosen)


def _glibc_has_tunable() -> bool:
    name, version = platform.libc_ver()
    parts = version.split(".")
    return name == "glibc" and len(parts) >= 2 and (int(parts[0]), int(parts[1])) >= (2, 35)


def _kernel_has_thp() -> bool:
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def hugepage_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``environ`` with ``glibc.malloc.hugetlb=1`` added to ``GLIBC_TUNABLES``, or None when
    a restart would change nothing (switched off, already set, not available here)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if HUGEPAGES not in settings(environ) or TUNABLE in tunables:
        return None
    if not (_glibc_has_tunable() and _kernel_has_thp()):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))}


def restart_with_hugepages() -> None:
    """Replace this process by the same command with huge pages on, when that changes
    anything (see :func:`hugepage_environment`); call it first thing in a program's entry."""
    environ = hugepage_environment(os.environ)
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def trim_heap(environ: Mapping[str, str] = os.environ) -> bool:
    """Hand the memory glibc's malloc holds unused back to the OS (``malloc_trim(0)``).

    True if memory was released; False when none was, when ``RESEARCH_MALLOC`` leaves ``trim``
    out, or when the C library is not glibc.
    """
    if TRIM not in settings(environ) or platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).malloc_trim(0))
