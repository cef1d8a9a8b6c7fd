"""Handing the model's work from one thread to another.

torch's OpenMP runtime keeps one pool of worker threads per thread that ran a parallel region,
for as long as that thread lives. With the loading thread's pool still there, the engine
thread's pool brings the process's OpenMP threads past the cores, and libgomp then shortens
its spin-wait: each parallel region wakes its workers through the kernel. Measured on 2 cores,
SmolLM2's compiled decode step took 4.7 ms on the thread that loaded the model and 14.3 ms on
the scheduler's thread; 5.1 ms there once the loading thread had released its pools."""

from __future__ import annotations

import ctypes
import functools
import os

OMP_PAUSE_SOFT = 1  # the OpenMP 5.0 constant: free the threads, keep the settings
_RUNTIMES = ("libgomp", "libiomp5", "libomp")


@functools.lru_cache(maxsize=1)
def _pause_functions() -> tuple:
    """omp_pause_resource_all of each OpenMP runtime in the process's maps: torch's, and any a
    wheel brought along (sentencepiece ships its own libgomp)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:  # no procfs: nothing to release
        return ()
    found = []
    for path in sorted(paths):
        if os.path.basename(path).startswith(_RUNTIMES):
            try:
                found.append(ctypes.CDLL(path).omp_pause_resource_all)
            except (OSError, AttributeError):  # an OpenMP older than 5.0
                continue
    return tuple(found)


def release_openmp_pool() -> bool:
    """Let the calling thread's OpenMP workers exit, in every OpenMP runtime loaded (a later
    parallel region on this thread starts new ones). Call it on a thread that hands its model
    work to another. False where no runtime offers a way to."""
    results = [pause(OMP_PAUSE_SOFT) == 0 for pause in _pause_functions()]
    return any(results)
