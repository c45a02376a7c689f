import os

import pytest

os.environ.setdefault("ADVFRAME_PROGRESS", "0")


@pytest.fixture
def host():
    """Built-ins and the reference attack, no installed entry points: tests never depend on them."""
    from advframe.testing import make_host

    return make_host()
