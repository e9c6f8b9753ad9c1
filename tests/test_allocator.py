"""The fast-allocator setting: set in-process by mallopt (no second interpreter start), inherited by children."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

# prints "start" once per interpreter start, then whether a 200 MB malloc came from the heap (glibc marks mmapped
# chunks with bit 1 of the size word before the block) and the variable children inherit
PROBE = r"""
import ctypes, os, sys
print("start", flush=True)
from pipelines.cli import ensure_fast_allocator
ensure_fast_allocator()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
p = libc.malloc(200 << 20)
print("mmapped" if ctypes.c_size_t.from_address(p - 8).value & 2 else "heap")
libc.free(p)
print(os.environ.get("MALLOC_MMAP_THRESHOLD_"))
"""


def _probe(**env_extra: str) -> list[str]:
    from pipelines.cli import ALLOCATOR_ENV

    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV and k != "SLICREG_ALLOCATOR"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, **env_extra}, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return out.split()


def test_mallopt_sets_the_threshold_in_process_without_re_executing():
    import ctypes

    from pipelines.cli import ALLOCATOR_ENV

    try:
        if not hasattr(ctypes.CDLL("libc.so.6"), "mallopt"):
            pytest.skip("no mallopt: not glibc")
    except OSError:
        pytest.skip("no libc.so.6: not glibc")
    threshold = ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert _probe() == ["start", "heap", threshold]  # one start; large blocks on the heap; children inherit it
    assert _probe(SLICREG_ALLOCATOR="reexec") == ["start", "start", "heap", threshold]  # the former way
    assert _probe(SLICREG_ALLOCATOR="default") == ["start", "mmapped", "None"]  # glibc's own behaviour
