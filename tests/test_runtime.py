"""The forward/training loops' allocator setting: freed blocks are kept, then handed back."""

from __future__ import annotations

import resource

import pytest
import torch

from canal import runtime, settings


def _faults_of_big_temporaries(n: int = 6) -> int:
    """Minor page faults of allocating, touching and freeing a 64 MiB tensor ``n`` times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t = torch.empty(16 << 20)  # 64 MiB: above glibc's largest adaptive mmap threshold
        t.fill_(1.0)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(runtime._glibc() is None, reason="glibc's malloc only")
def test_keep_heap_reuses_freed_pages_and_is_switchable():
    outside = _faults_of_big_temporaries()
    with runtime.keep_heap():
        _faults_of_big_temporaries(2)  # the heap grows once
        with runtime.keep_heap():  # nested: acts once
            kept = _faults_of_big_temporaries()
        assert runtime._heap_depth == 1
    assert runtime._heap_depth == 0
    # outside: a fresh mmap (16,384 zeroed pages) per tensor; inside: the same pages again
    assert outside > 3 * (64 << 20) // resource.getpagesize()  # at least half of 6 x 64 MiB
    assert kept < outside / 3, (kept, outside)
    # after leaving, glibc maps such blocks afresh again (memory goes back to the system)
    assert _faults_of_big_temporaries() > outside / 2
    settings.keep_heap = False
    try:
        with runtime.keep_heap():
            off = _faults_of_big_temporaries()
    finally:
        settings.keep_heap = True
    assert off > outside / 2
