"""Several processes on CPU (gloo): evaluate, scan and repair under torchrun / accelerate launch match one process.

Each multi-process test launches the real CLI twice over (one process, then two), 1 thread a process, and compares
the results: evaluate's CA/ASR exactly, the scan's flagged labels, victims and triggers exactly, a repair's CA/ASR
within a stated tolerance, with proof that DDP kept the two processes' weights identical.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from forensics.core import distributed

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
REPAIR_TOLERANCE = 0.02  # |CA or ASR (2 processes) - (1 process)|: float rounding of shared-out batches, ~1 image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, *args: str) -> dict:
    """``python -m forensics --quiet ARGS`` in one process (``one``), under torchrun or accelerate launch with two
    processes; the JSON rank 0 printed."""
    cli = ["-m", "forensics", "--quiet", *args]
    if launcher == "one":
        cmd = [sys.executable, *cli]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_port", str(_free_port()), *cli]
    else:  # accelerate's launcher with two local processes (--multi_gpu starts them; no GPU: gloo on the CPU)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += ["--main_process_port", str(_free_port()), *cli]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("\n{\n") + out.startswith("{\n") == 1, out[-2000:]  # one result printed, by rank 0 alone
    return json.loads(out[out.index("{") :])


def _outputs(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _no_partials(folder: Path) -> None:
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.partial-")]


# --------------------------------------------------------------------------- helpers, one process


def test_helpers_are_the_identity_in_one_process():
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.gather({"a": 1}) == [{"a": 1}] and distributed.broadcast(3) == 3
    distributed.barrier()
    x = torch.arange(6.0, requires_grad=True)
    assert distributed.gather_rows(x, [6]) is x
    assert torch.equal(distributed.global_mean(x, 6), x.mean())
    assert distributed.rank_and_world(None, None) == (0, 1, False)


def test_shards_cover_every_item_once_in_order():
    for n in (0, 1, 2, 7, 40, 301):
        for world in (1, 2, 3, 8):
            blocks = [distributed.shard_range(n, r, world) for r in range(world)]
            assert [i for lo, hi in blocks for i in range(lo, hi)] == list(range(n))
            assert distributed.shard_sizes(n, world) == [hi - lo for lo, hi in blocks]
            assert max(distributed.shard_sizes(n, world)) - min(distributed.shard_sizes(n, world)) <= 1


def test_weights_digest_sees_one_changed_value():
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert distributed.weights_digest(a) == distributed.weights_digest(b)
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert distributed.weights_digest(a) != distributed.weights_digest(b)


# --------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_evaluate_with_two_processes_gives_exactly_the_one_process_ca_and_asr():
    args = ("evaluate", "demo", "--probe", "demo-clean")
    one, two = _launch("one", *args), _launch("torchrun", *args)
    assert two["processes"] == 2 and "processes" not in one
    assert (two["ca"], two["asr"], two["n_clean"], two["n_attacked"]) == (
        one["ca"],
        one["asr"],
        one["n_clean"],
        one["n_attacked"],
    )
    assert one["asr"] > 0.8  # the planted trigger works: the comparison is of a real ASR


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """The demo scanned on 40 images by the oracle-guided detector: in one process and under torchrun with two."""
    root = tmp_path_factory.mktemp("scans")
    args = ("scan", "demo", "--detectors", "oracle-guided", "--max-images", "40")
    for launcher in ("one", "torchrun"):
        _launch(launcher, *args, "--out", str(root / launcher))
    return root / "one", root / "torchrun"


@pytest.mark.slow
def test_scan_with_two_processes_finds_what_one_process_finds(scans):
    one, two = (json.loads((folder / "report.json").read_text()) for folder in scans)
    assert [f["label"] for f in one["flagged_labels"]] == ["flower"]  # the demo's target, so the match means something
    for key in ("flagged_labels", "victims", "triggers", "compact_set"):
        assert two[key] == one[key], key
    assert {k: two["verdict"][k] for k in ("verdict", "target", "victims")} == {
        k: one["verdict"][k] for k in ("verdict", "target", "victims")
    }
    assert [(e["captured"], e["hijack_box"]) for e in two["images"]] == [
        (e["captured"], e["hijack_box"]) for e in one["images"]
    ]
    assert _outputs(scans[1]) == _outputs(scans[0])
    assert (scans[1] / "trigger_0_flower.png").read_bytes() == (scans[0] / "trigger_0_flower.png").read_bytes()
    _no_partials(scans[1])


@pytest.mark.slow
def test_trigger_inversion_shares_its_labels_out_and_finds_what_one_process_finds(tmp_path):
    """Each process inverts its block of the (label, family) jobs; gathered, the evidence is the one-process one
    (in the quick profile: the same jobs, shared out alike, each with fewer steps)."""
    args = ("scan", "demo", "--probe", "demo-clean", "--detectors", "trigger-inversion", "--max-images", "24")
    args += ("--detector-profile", "quick")
    for launcher in ("one", "torchrun"):
        _launch(launcher, *args, "--out", str(tmp_path / launcher))
    one, two = (json.loads((tmp_path / launcher / "report.json").read_text()) for launcher in ("one", "torchrun"))
    one_ti, two_ti = one["detectors"]["trigger-inversion"], two["detectors"]["trigger-inversion"]
    assert len(one_ti["metrics"]["labels_inverted"]) >= 5  # enough jobs that each process has several
    assert sum(len(rows) for rows in one_ti["label_evidence"].values()) >= 10
    for key in ("label_evidence", "flagged_labels", "inverted_triggers"):
        assert two_ti[key] == one_ti[key], key
    assert two_ti["metrics"]["labels_inverted"] == one_ti["metrics"]["labels_inverted"]
    assert two_ti["metrics"]["processes"] == 2 and "processes" not in one_ti["metrics"]  # shared out, then gathered
    untimed = lambda verdict: {  # noqa: E731 - the verdict with each detector's seconds left out
        **verdict,
        "evidence": {name: {k: v for k, v in e.items() if k != "seconds"} for name, e in verdict["evidence"].items()},
    }
    assert untimed(two["verdict"]) == untimed(one["verdict"])
    assert _outputs(tmp_path / "torchrun") == _outputs(tmp_path / "one")
    for picture in (tmp_path / "one").glob("inverted/*.png"):
        assert (tmp_path / "torchrun" / picture.relative_to(tmp_path / "one")).read_bytes() == picture.read_bytes()
    _no_partials(tmp_path / "torchrun")


def _check_repair(one: dict, two: dict, folder: Path, reference: Path) -> dict:
    """The two-process repair's CA/ASR within the tolerance of one process's, its DDP proof, and one set of files."""
    assert two["before"] == one["before"]  # the suspect is scored alike (sharded + gathered)
    for key, value in one["after"].items():
        assert abs(two["after"][key] - value) <= REPAIR_TOLERANCE, (key, two["after"], one["after"])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["processes"]["world_size"] == 2
    digests = metrics["processes"]["weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # DDP synced the gradients: both ranks ended alike
    assert any("DDP on 2 processes" in note for note in metrics["notes"])
    assert "processes" not in json.loads((reference / "metrics.json").read_text())
    assert (
        _outputs(folder)
        == _outputs(reference)
        == [".forensics-output.json", "metrics.json", "model.json", "model.safetensors", "report.html"]
    )
    _no_partials(folder)
    return metrics


@pytest.mark.slow
def test_oracle_finetune_repair_runs_ddp_and_matches_one_process(scans, tmp_path):
    args = ("repair", "demo", "--findings", str(scans[0]), "--param", "epochs=2")
    one = _launch("one", *args, "--out", str(tmp_path / "one"))
    two = _launch("torchrun", *args, "--out", str(tmp_path / "two"))
    assert one["after"]["asr_true"] < one["before"]["asr_true"] - 0.3  # the repair does something to compare
    metrics = _check_repair(one, two, tmp_path / "two", tmp_path / "one")
    reference = json.loads((tmp_path / "one" / "metrics.json").read_text())
    for a, b in zip(metrics["history"], reference["history"]):  # the same global loss, step for step
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@pytest.mark.slow
def test_cleanclip_repair_under_accelerate_launch_runs_ddp_and_matches_one_process(tmp_path):
    args = ("repair", "demo", "--method", "cleanclip", "--budget", "40", "--param", "epochs=1")
    one = _launch("one", *args, "--out", str(tmp_path / "one"))
    two = _launch("accelerate", *args, "--out", str(tmp_path / "two"))
    metrics = _check_repair(one, two, tmp_path / "two", tmp_path / "one")
    reference = json.loads((tmp_path / "one" / "metrics.json").read_text())
    # whole-batch contrastive loss (embeddings gathered) and BatchNorm statistics over the whole batch
    assert metrics["history"][0]["loss"] == pytest.approx(reference["history"][0]["loss"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (("repair", "demo", "--method", "cbpt"), "cbpt does not run on several processes yet"),
        (("compare", "demo", "--methods", "cleanclip"), "compare does not run on several processes yet"),
    ],
)
def test_what_is_not_made_for_several_processes_is_refused_in_one_line(args, message, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += ["-m", "forensics", "--quiet", *args, "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and all(message in line for line in lines), proc.stderr[-2000:]  # one line a process
    assert not (tmp_path / "out").exists()


FAILING_RANK = """
import os, sys
from forensics import cli
from forensics.detect import trigger_inversion

if os.environ["RANK"] == "1":  # this process alone fails inside its share of the inversion
    def fail(*args, **kwargs):
        raise RuntimeError("this process alone fails")

    trigger_inversion.TriggerInversion.invert_label = fail
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_process_failing_alone_stops_the_run_at_once_and_writes_nothing(tmp_path):
    """One rank fails inside a shared-out detector while the other still fits: its one-line error, then the launcher
    stops the other (no wait at the gather for the process group's timeout), and no output folder appears."""
    driver = tmp_path / "failing_rank.py"
    driver.write_text(FAILING_RANK)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += [str(driver), "--quiet", "scan", "demo", "--probe", "demo-clean", "--detectors", "trigger-inversion"]
    cmd += ["--max-images", "12", "--out", str(out)]
    started = time.time()
    env = {**ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert time.time() - started < 150  # far from the 3-hour timeout the other would wait for at its gather
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines and "this process alone fails" in lines[0], proc.stderr[-2000:]
    assert not out.exists()
    _no_partials(out)
