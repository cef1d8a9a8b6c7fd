"""Entry point inside the emulated aarch64 root: report the platform, then run pytest.

One interpreter for both, because importing torch under qemu takes ~15 s.
Usage: python3.11 scripts/aarch64/run_tests.py [pytest args...]
"""

import platform
import sys

import pytest
import torch

kleidiai = torch.backends.kleidiai.is_available()
print(
    f"aarch64 root: python {platform.python_version()} on {platform.machine()}, "
    f"torch {torch.__version__}, KleidiAI available: {kleidiai}, threads: {torch.get_num_threads()}",
    flush=True,
)
sys.exit(pytest.main(sys.argv[1:]))
