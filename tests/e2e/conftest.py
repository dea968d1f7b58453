import pytest

from tests.conftest import require_root
from tests.e2e.rig import Rig


@pytest.fixture
def rig(uid, tmp_path):
    require_root()
    r = Rig(uid, tmp_path)
    try:
        yield r
    finally:
        r.teardown()


@pytest.fixture
def node(rig):
    """One node with its daemon running."""
    n = rig.add_node("n1")
    n.start_daemon()
    return n
