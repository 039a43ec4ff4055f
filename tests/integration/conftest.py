"""Integration fixtures: one local Ray session per test module (fresh actors cost ~5 s each)."""

import pytest


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()

