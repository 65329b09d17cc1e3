"""research.allocator: a program that calls restart_with_hugepages() first runs again with
glibc's huge-page tunable, and then reuses big blocks with far fewer page faults; off with
RESEARCH_MALLOC=default. Each case runs in a fresh process (tunables are read at start-up)."""

import json
import os
import subprocess
import sys

import pytest

from research import allocator
from research.errors import ExpectedError

# Restarts itself first (as the `research` command does), then allocates, touches and frees a
# 64 MiB block five times; prints the tunables it ran with and the minor page faults.
PROGRAM = """
import ctypes, json, os, resource
from research.allocator import restart_with_hugepages
restart_with_hugepages()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "faults": faults}))
"""
PAGES = 5 * (64 << 20) // 4096  # 4 KiB pages the five rounds touch


def _run(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.ENV)}
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], env=clean | env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


available = allocator.hugepage_environment({}) is not None


@pytest.mark.skipif(not available, reason="needs glibc 2.35+ and transparent huge pages")
def test_restart_turns_huge_pages_on_and_the_switch_turns_them_off():
    on, off = _run(), _run(**{allocator.ENV: "default"})
    assert on["tunables"] == "glibc.malloc.hugetlb=1"
    assert off["tunables"] is None
    assert off["faults"] > PAGES // 2  # glibc's default: every round faults its pages in
    assert on["faults"] < off["faults"] // 20


def test_the_users_own_tunables_are_kept():
    env = allocator.hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    if available:
        assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # A setting of the user's own is left alone: no restart.
    assert allocator.hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert allocator.hugepage_environment({allocator.ENV: "default"}) is None


def test_unknown_setting_is_one_clear_error():
    with pytest.raises(ExpectedError, match="RESEARCH_MALLOC='fast' in the environment: valid"):
        allocator.hugepage_environment({allocator.ENV: "fast"})


# The `research` command line: `config` restarts with huge pages, `bench` does not (it times
# both frameworks in one process; see research/cli.py).
COMMAND = """
import os, sys
print(os.environ.get("GLIBC_TUNABLES"), flush=True)
from research.cli import main
sys.exit(main())
"""


@pytest.mark.skipif(not available, reason="needs glibc 2.35+ and transparent huge pages")
@pytest.mark.parametrize(
    "command, restarts",
    [(["config", "--config", "experiments/configs/quickstart.py"], True), (["bench", "-h"], False)],
)
def test_the_command_restarts_except_for_bench(command, restarts):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.ENV)}
    out = subprocess.run(
        [sys.executable, "-c", COMMAND, *command], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    printed = out.stdout.splitlines()[:2]
    assert printed[0] == "None"
    assert (printed[1] == "glibc.malloc.hugetlb=1") == restarts, printed
