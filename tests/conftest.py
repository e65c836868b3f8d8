"""Shared test setup: ``tests/`` importable (``bundle_run``), one intra-op thread for in-process tests."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tests use tiny tensors, for which torch's thread pool costs more than it gives (and on a shared
    2-core machine oversubscription slowed tiny convolutions by up to ~50×). Bundle runs in subprocesses
    keep torch's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
