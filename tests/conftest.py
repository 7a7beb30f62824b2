import os
import subprocess
import sys

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


# The demo model that the slow tests share: half the demo schedule (iterations
# and milestones), 300 iterations, a few minutes on 2 CPU cores. Measured: mAP
# @[.5:.95] 0.637 (AP50 0.981).
DEMO_ITERS = 300


def assert_user_error(proc, *words):
    """A user error: exit 2, no traceback, one line holding every word."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def run_cli(*args, cwd, env=None, check=True, timeout=600):
    """`python -m retinanet ARGS` in `cwd`; AssertionError with its output when check fails."""
    run_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "retinanet", *args], cwd=cwd, env=run_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"retinanet {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def trained(tmp_path_factory, demo_root):
    """Train the demo preset from scratch via the CLI, once per session: (workdir, stdout, env)."""
    from retinanet.data import demo

    work = tmp_path_factory.mktemp("train")
    env = {"RETINANET_CACHE": str(demo_root.parent)} if demo_root.name == f"demo-v{demo.VERSION}" else {}
    if not env:  # demo_root is a plain folder: point the cache at a copy with the expected name
        cache = tmp_path_factory.mktemp("cache")
        os.symlink(demo_root, cache / f"demo-v{demo.VERSION}")
        env = {"RETINANET_CACHE": str(cache)}
    proc = run_cli("train", "demo.pth", "--schedule", "0.5", "--val-iters", str(DEMO_ITERS), "--seed", "1",
                   cwd=work, env=env)
    return work, proc.stdout, env
