"""The loading thread hands its OpenMP workers back before the scheduler's thread takes over."""

import os

import pytest
import torch

from llmrun.runtime.threads import release_openmp_pool


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs procfs")
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one OpenMP thread: no pool to release")
def test_release_ends_the_calling_threads_workers():
    x = torch.randn(512, 512)
    x @ x  # a parallel region: this thread's pool of workers exists now
    with_pool = _threads()
    assert release_openmp_pool()
    assert _threads() == with_pool - (torch.get_num_threads() - 1)
    torch.testing.assert_close((x @ x)[0, :4], (x.double() @ x.double())[0, :4].float(),
                               rtol=1e-4, atol=1e-3)  # and the next region still runs
    assert _threads() == with_pool
