"""research.allocator: a program that calls restart_with_hugepages() first runs again with
glibc's huge-page tunable, and then reuses big blocks with far fewer page faults; trim_heap()
hands freed small blocks back to the OS; RESEARCH_MALLOC names the settings that are on. Each
measuring case runs in a fresh process (tunables are read at start-up, the heap is its own)."""

import json
import os
import platform
import re
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
QUICKSTART = "experiments/configs/quickstart.py"


def _run(program: str = PROGRAM, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.ENV)}
    out = subprocess.run(
        [sys.executable, "-c", program], env=clean | env, capture_output=True, text=True
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


@pytest.mark.parametrize(
    "value, on",
    [
        (None, {"hugepages", "trim"}),
        ("default", set()),
        ("hugepages", {"hugepages"}),
        ("trim", {"trim"}),
        ("trim,hugepages", {"hugepages", "trim"}),
    ],
)
def test_the_environment_names_the_settings_that_are_on(value, on):
    environ = {} if value is None else {allocator.ENV: value}
    assert allocator.settings(environ) == on
    restarts = allocator.hugepage_environment(environ) is not None
    assert restarts == ("hugepages" in on and available)
    if "trim" not in on:
        assert allocator.trim_heap(environ) is False


@pytest.mark.parametrize("value", ["fast", "", "trim,fast", "default,trim", "trim,"])
def test_unknown_setting_is_one_clear_error(value):
    message = f"RESEARCH_MALLOC={value!r} in the environment: valid choices are 'default' or"
    for read in (allocator.hugepage_environment, allocator.trim_heap, allocator.settings):
        with pytest.raises(ExpectedError, match=re.escape(message)):
            read({allocator.ENV: value})


def test_the_command_stops_on_an_unknown_setting_with_one_line():
    env = {**os.environ, allocator.ENV: "fast"}
    command = [sys.executable, "-m", "research", "config", "--config", QUICKSTART]
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("error: RESEARCH_MALLOC='fast' in the environment: valid")
    assert len(out.stderr.splitlines()) == 1, out.stderr


# Frees all but the last of 128 MiB of 1 KiB blocks (the last keeps the heap's top in use, so
# free() cannot shrink the heap), then trims; prints the resident memory that went back.
TRIM_PROGRAM = """
import ctypes, json
from research.allocator import trim_heap
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def resident():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))
blocks = [libc.malloc(1024) for _ in range(1 << 17)]
for block in blocks:
    ctypes.memset(block, 1, 1024)
for block in blocks[:-1]:
    libc.free(block)
before = resident()
trimmed = trim_heap()
print(json.dumps({"trimmed": trimmed, "released": before - resident()}))
"""
FREED = ((1 << 17) - 1) * 1024


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_hands_freed_small_blocks_back_unless_switched_off():
    on = _run(TRIM_PROGRAM)
    off = _run(TRIM_PROGRAM, **{allocator.ENV: "hugepages"})
    assert on["trimmed"] is True and on["released"] > 0.9 * FREED, on
    # Without the trim glibc keeps them: no resident memory goes back.
    assert off["trimmed"] is False and abs(off["released"]) < 0.02 * FREED, off


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
    [(["config", "--config", QUICKSTART], True), (["bench", "-h"], False)],
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
