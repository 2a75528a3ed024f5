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
