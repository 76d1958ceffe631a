"""The forward/training loops' allocator setting: freed blocks are kept, then handed back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from canal import runtime

# run in a fresh interpreter: glibc's thresholds are process-wide and other tests change them
_PROBE = """
import json, resource, torch
from canal import runtime, settings

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def faults(n=6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t = torch.empty(16 << 20)  # 64 MiB: above glibc's largest adaptive mmap threshold
        t.fill_(1.0)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

out = {"outside": faults()}
settings.keep_heap = False  # switched off: glibc as it comes
with runtime.keep_heap():
    out["off"] = faults()
settings.keep_heap = True
with runtime.keep_heap():
    faults(2)  # the heap grows once
    with runtime.keep_heap():  # nested: acts once
        out["kept"] = faults()
    out["depth_inside"] = runtime._heap_depth
    out["rss_inside"] = rss()
out["depth_after"] = runtime._heap_depth
out["rss_after"] = rss()
print(json.dumps(out))
"""


@pytest.mark.skipif(runtime._glibc() is None, reason="glibc's malloc only")
def test_keep_heap_reuses_freed_pages_and_is_switchable():
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    out = json.loads(res.stdout.strip().splitlines()[-1])
    pages = (64 << 20) // 4096
    assert out["depth_inside"] == 1 and out["depth_after"] == 0
    # outside: a fresh mmap (16,384 zeroed pages) per tensor; inside: the same pages again
    assert out["outside"] > 3 * pages
    assert out["kept"] < out["outside"] / 3
    # on leaving, the kept 64 MiB goes back to the system
    assert out["rss_inside"] - out["rss_after"] > 48 << 20
    # switched off, it does nothing
    assert out["off"] > 3 * pages
