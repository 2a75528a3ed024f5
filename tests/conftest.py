"""Shared test setup: never touch the network, stay within two CPU threads, register markers."""

from __future__ import annotations

import os

# before anything imports huggingface_hub (open_clip does): its constants read the variable at import
os.environ["HF_HUB_OFFLINE"] = "1"

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_configure(config):
    # also declared in pytest.ini; repeated here so the marker is known whatever config file is in use
    config.addinivalue_line("markers", "slow: long-running, still run in CI")


# Fixtures that start the app, drive a browser, run a full scan or repair, or launch processes: a test using one
# is slow, whatever its own marks say, so nothing expensive slips into the fast tier by accident.
SLOW_FIXTURES = {"workbench", "open_workbench", "page", "session_a", "scans", "poisoned_scan", "quick_demo_scan"}
# tests measured over the fast tier's budget (a run of ``-m "not slow"`` with FORENSICS_FAST_TEST_SECONDS=12:
# each of these set up a scan or a repair of its own, or started processes); a module name marks all its tests
SLOW_TESTS = {
    "tests/test_cascade_scan.py",
    "tests/test_findings_validation.py",
    "tests/test_scan_many.py",
    "tests/test_victim_trigger.py",
    "tests/test_compare.py::test_repair_without_findings_uses_the_budget_and_held_out_images",
    "tests/test_cli.py::test_the_cli_as_a_process_prints_json_and_exits_2_on_one_line_errors",
    "tests/test_findings_identity.py::test_same_model_findings_are_accepted_without_a_note",
    "tests/test_interrupted_outputs.py::test_an_interrupted_rescan_keeps_the_previous_result",
    "tests/test_model_reference.py::test_quick_gelu_from_the_cli_reaches_the_loaded_model",
    "tests/test_oracle_finetune.py::test_stamped_rows_are_pulled_to_the_originals_embedding_of_their_clean_source",
    "tests/test_oracles.py::test_sam_automatic_and_prompted_code_paths",
    "tests/test_outputs_never_replace_inputs.py::test_repair_into_the_scan_folder_would_replace_the_findings",
}
# a fast-tier test (its fixtures' set-up included) that runs longer fails loudly
FAST_TEST_SECONDS = float(os.environ.get("FORENSICS_FAST_TEST_SECONDS", "120"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        node = item.nodeid.split("[")[0]
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or {node, node.split("::")[0]} & SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slow") is None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(FAST_TEST_SECONDS))


_MODULES_NOT_IMPORTED = pytest.StashKey[tuple]()


def _library_modules() -> list[str]:
    """Every module of the library, by its file (nothing imported to list them)."""
    names = []
    for path in sorted((REPO / "forensics").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def pytest_sessionfinish(session, exitstatus):
    """The fast tier's module coverage: how many of the library's modules its tests imported, and which not.

    Run over the whole tests folder with ``-m "not slow"``, a module no fast test imports fails the run, so every
    module keeps a test in the development loop."""
    config = session.config
    whole_suite = not config.args or [Path(a).resolve() for a in config.args] == [Path(__file__).resolve().parent]
    if config.option.markexpr != "not slow" or not whole_suite or config.option.keyword:
        return
    modules = _library_modules()
    config.stash[_MODULES_NOT_IMPORTED] = (len(modules), [m for m in modules if m not in sys.modules])
    if config.stash[_MODULES_NOT_IMPORTED][1] and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _MODULES_NOT_IMPORTED not in config.stash:
        return
    total, missing = config.stash[_MODULES_NOT_IMPORTED]
    imported = total - len(missing)
    terminalreporter.write_line(f"fast tier module coverage: {imported} of {total} forensics modules imported")
    if missing:
        terminalreporter.write_line("not imported by any fast test: " + ", ".join(missing), red=True)


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


@pytest.fixture(scope="session")
def quick_demo_scan():
    """One scan of 60 demo images (some carry the planted trigger) by every detector in the quick profile, shared
    by the tests of plumbing (reports, evidence, settings); never changed by them (copy what you modify)."""
    from forensics.pipelines.scan import scan

    return scan("demo", "demo", max_images=60, profile="quick")


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Every test leaves torch's thread count as it found it: a test that set one thread and returned slowed every
    later test of the session (the verdict scans, the UI's in-process calls) to one thread."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (the machine is small and shared), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
