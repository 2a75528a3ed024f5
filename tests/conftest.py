"""Shared test setup: never touch the network, stay within two CPU threads, register markers."""

from __future__ import annotations

import os

# before anything imports huggingface_hub (open_clip does): its constants read the variable at import
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_configure(config):
    # also declared in pytest.ini; repeated here so the marker is known whatever config file is in use
    config.addinivalue_line("markers", "slow: long-running, still run in CI")


import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def workbench(tmp_path_factory):
    """``python app.py`` running on a free local port (as a user starts it); yields its URL, stops it after."""
    port = _free_port()
    log = tmp_path_factory.mktemp("workbench") / "app.log"
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "2",
    }
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError(f"app.py did not answer on {url} within 180 s:\n{log.read_text()[-3000:]}")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
