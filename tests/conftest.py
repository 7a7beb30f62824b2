import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: trains a model; minutes on a CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The embedded demo dataset, generated once per test session."""
    from retinanet.data import demo

    root = os.environ.get("RETINANET_CACHE")
    return demo.ensure(None if root else tmp_path_factory.mktemp("demo"))
