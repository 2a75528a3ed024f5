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
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(log_dir: Path, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """``python app.py`` on a free local port (as a user starts it), with ``extra_env``; yields its URL, stops it."""
    port = _free_port()
    log = log_dir / "app.log"
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "2",
        **(extra_env or {}),
    }
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"app.py did not answer on {url}:\n{log.read_text()[-3000:]}") from None
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def workbench(tmp_path_factory):
    """``python app.py`` running on a free local port (as a user starts it); yields its URL, stops it after."""
    with running_app(tmp_path_factory.mktemp("workbench")) as url:
        yield url


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (the machine is small and shared), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
