import pytest

from megatron_m2.testing import shutdown_pools


@pytest.fixture(scope="session", autouse=True)
def _stop_worker_pools():
    yield
    shutdown_pools()
