"""Shared test fixtures: privilege checks and unique names, so parallel or leftover runs never collide."""
import os
import uuid

import pytest


def require_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF, network namespaces)")


@pytest.fixture
def uid() -> str:
    """A short unique tag for names of namespaces, links and pins this test creates."""
    return uuid.uuid4().hex[:6]
