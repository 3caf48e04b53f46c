import pytest

from megatron_m2.testing import shutdown_pools


@pytest.fixture(scope="session", autouse=True)
def _stop_worker_pools():
    yield
    shutdown_pools()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The embedded default's data set and tokenizer (what `make demo` prepares), once per session."""
    from megatron_m2.demo import prepare

    out = tmp_path_factory.mktemp("demo")
    prepare(out)
    return out
