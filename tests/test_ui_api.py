"""The workbench's API through gradio_client against `python app.py`: main endpoints, concurrency, bad inputs."""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_IMAGE = REPO / "forensics" / "assets" / "demo" / "probe" / "images"
CHECKPOINT = "checkpoint file (upload or server path)"
SCAN_IMAGES = 40


def _load(client: Client, source: str, upload=None, arch=None) -> tuple:
    return client.predict(source, upload, "", arch, "", False, "fallback", "", api_name="/load_model")


def _error(call) -> str:
    with pytest.raises(Exception) as info:
        call()
    return str(info.value)


def _flagged(result: tuple) -> list[str]:
    table = result[2]
    return [row[0] for row in table["data"]]


@pytest.fixture(scope="module")
def scans(workbench):
    """Two clients scanning at once, in the quick detector profile (this tests sessions and wiring; the verdict's
    quality is tested on full scans): one on the backdoored demo, one (after loading it) on the clean twin."""
    poisoned, clean = Client(workbench, verbose=False), Client(workbench, verbose=False)
    facts = _load(clean, "demo-clean (its clean twin)")[0]
    assert facts["architecture"] == "tiny-rn" and facts["source"].endswith("demo_clean.safetensors")
    with ThreadPoolExecutor(2) as pool:
        jobs = [
            pool.submit(c.predict, "demo", None, SCAN_IMAGES, "quick", "", api_name="/scan") for c in (poisoned, clean)
        ]
        results = [j.result(timeout=1200) for j in jobs]
    return {"poisoned": (poisoned, results[0]), "clean": (clean, results[1])}


@pytest.mark.slow
def test_concurrent_scans_are_both_right(scans):
    _, poisoned = scans["poisoned"]
    _, clean = scans["clean"]
    assert _flagged(poisoned) == ["flower"], poisoned[0]
    assert "Flagged labels: **flower**" in poisoned[0]
    assert _flagged(clean) == [], clean[0]
    assert "Flagged labels: none" in clean[0]
    triggers = poisoned[4]
    assert len(triggers) == 1 and triggers[0]["caption"].startswith("flower: flips")
    assert len(poisoned[5]) >= 3  # victims
    assert len(poisoned[1]) == SCAN_IMAGES  # the ranked gallery holds every scanned image (fewer than 60)
    # the verdict on top of the Findings tab, with every detector's evidence beside it
    assert poisoned[8].startswith("## Verdict: **backdoored**") and "Verdict: **backdoored**" in poisoned[0]
    assert [row[0] for row in poisoned[9]["data"]] == ["oracle-guided", "trigger-inversion", "embedding-density"]
    assert clean[8].startswith("## Verdict:")  # 40 images are too few to promise the clean twin's verdict


@pytest.mark.slow
def test_paste_trigger_flips_a_clean_image(scans):
    client, _ = scans["poisoned"]
    image, verdict = client.predict(
        "0: flower", handle_file(str(DEMO_IMAGE / "arrow_000.png")), "bottom-right", api_name="/paste_trigger"
    )
    assert Path(image).is_file()
    assert verdict.startswith("Before: arrow") and "with the trigger: flower" in verdict and "flips" in verdict


def test_learn_tab_backdoored_flips_clean_twin_does_not(workbench):
    client = Client(workbench, verbose=False)
    clean, attacked, table, note = client.predict(
        "the demo's planted trigger", "", handle_file(str(DEMO_IMAGE / "arrow_000.png")), 0, api_name="/learn_attack"
    )
    rows = {r[0]: r for r in table["data"]}
    assert rows["backdoored demo"][1].startswith("arrow") and rows["backdoored demo"][2].startswith("flower")
    assert not rows["clean twin"][2].startswith("flower")
    assert "checkerboard" in note


def test_evaluate_endpoint_reports_ca_and_asr(workbench):
    client = Client(workbench, verbose=False)
    result = client.predict("demo", api_name="/evaluate")
    assert result["ca"] >= 0.45 and result["asr"] >= 0.95
    assert "excludes images whose true class is the target" in result["note"]


def test_malicious_pickle_is_refused_and_never_runs(workbench, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": Evil()}))
    client = Client(workbench, verbose=False)
    text = _error(lambda: _load(client, CHECKPOINT, [handle_file(str(evil))]))
    assert "refused evil.pt" in text and "nothing in it was run" in text
    assert not marker.exists()
    assert _load(client, "demo (backdoored demo CLIP)")[0]["architecture"] == "tiny-rn"  # the session carries on


def test_corrupt_and_mismatched_checkpoints_are_named(workbench, tmp_path):
    client = Client(workbench, verbose=False)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\0garbage" * 64)
    assert "corrupt.safetensors is not a readable" in _error(
        lambda: _load(client, CHECKPOINT, [handle_file(str(corrupt))])
    )
    # the demo's ResNet weights with a ViT model's sidecar: every missing/unexpected key is reported by name
    from forensics.core.models import load_model, save_model

    save_model(load_model("random:tiny-vit"), tmp_path / "vit" / "model.safetensors")
    shutil.copy(
        REPO / "forensics" / "assets" / "demo" / "models" / "demo_poisoned.safetensors",
        tmp_path / "suspect.safetensors",
    )
    shutil.copy(tmp_path / "vit" / "model.json", tmp_path / "suspect.json")
    text = _error(
        lambda: _load(
            client,
            CHECKPOINT,
            [handle_file(str(tmp_path / "suspect.safetensors")), handle_file(str(tmp_path / "suspect.json"))],
        )
    )
    assert "does not fit this architecture" in text and "missing keys: visual.class_embedding" in text
    assert "unexpected keys: visual.attnpool" in text


def test_bad_probe_uploads_and_images_give_clear_messages(workbench, tmp_path):
    client = Client(workbench, verbose=False)
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    assert "empty.zip is empty" in _error(lambda: client.predict("demo", handle_file(str(empty)), 10, api_name="/scan"))
    slip = tmp_path / "slip.zip"
    with zipfile.ZipFile(slip, "w") as zf:
        zf.writestr("../../escape.png", b"x")
    assert "unsafe path" in _error(lambda: client.predict("demo", handle_file(str(slip)), 10, api_name="/scan"))
    assert not (tmp_path.parent / "escape.png").exists()
    # an image too large to be safe to decode, inside an otherwise valid ImageFolder
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as zf:
        Image.new("RGB", (8100, 8100), "white").save(tmp_path / "huge.png")
        zf.write(tmp_path / "huge.png", "probe/cat/huge.png")
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "ok.png")
        zf.write(tmp_path / "ok.png", "probe/dog/ok.png")
    assert "huge.png is too large" in _error(
        lambda: client.predict("demo", handle_file(str(big)), 10, api_name="/scan")
    )
    notimage = tmp_path / "notimage.png"
    notimage.write_text("this is text, not a picture")
    text = _error(lambda: client.predict("badnet", "", handle_file(str(notimage)), 0, api_name="/learn_attack"))
    assert "notimage.png" in text or "cannot identify image" in text
    # the same session still works after all of that
    assert client.predict("demo", api_name="/evaluate")["ca"] > 0.4


@pytest.mark.slow
def test_repair_without_a_scan_and_compare_view(workbench):
    """A clean-budget method repairs from the Repair tab without a scan; the Compare view tabulates the same run."""
    client = Client(workbench, verbose=False)
    refused = _error(lambda: client.predict("cleanclip", 5, 0, 80, "", "fp16", api_name="/repair"))
    assert "fp16" in refused and "\n" not in refused.strip()
    chart, rows, files, summary = client.predict("cleanclip", 5, 0, 80, "", "fp32", api_name="/repair")
    table = {r[0]: (r[1], r[2]) for r in rows["data"]}
    assert table["asr"][0] >= 0.9 and table["asr"][1] < 0.5 and table["ca"][1] >= table["ca"][0] - 0.1
    assert any(str(f).endswith(".safetensors") for f in files)
    assert summary.startswith("### cleanclip: CA")
    table, chart, files = client.predict(["cleanclip"], 80, "fp32", api_name="/compare")
    headers, data = table["headers"], table["data"]
    row = dict(zip(headers, data[0]))
    assert row["method"] == "cleanclip" and row["status"] == "ok"
    asr_before = [h for h in headers if h.startswith("ASR") and h.endswith("before")][0]
    assert float(row[asr_before]) >= 0.9 and float(row[asr_before.replace("before", "after")]) < 0.5
    assert {Path(f).name for f in files} == {"compare.md", "compare.json", "report.html"}


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_no_endpoint_hands_back_a_server_path(workbench, tmp_path):
    """The facts and scores of an uploaded checkpoint (and of the bundled demo) name files, never where the server
    keeps them: an upload's folder carries the caller's session key."""
    client = Client(workbench, verbose=False)
    from forensics.core.models import load_model, save_model

    save_model(load_model("demo-clean"), tmp_path / "mine.safetensors")
    mine = [handle_file(str(tmp_path / "mine.safetensors")), handle_file(str(tmp_path / "mine.json"))]
    uploaded = _load(client, CHECKPOINT, mine)
    scores = client.predict("demo-clean", api_name="/evaluate")
    demo = _load(client, "demo (backdoored demo CLIP)")
    assert uploaded[0]["source"] == "mine.safetensors" and demo[0]["source"] == "demo_poisoned.safetensors"
    assert scores["model"] == "mine.safetensors" and scores["ca"] > 0.3
    for text in _strings([uploaded[:2], demo[:2], scores]):
        assert not text.startswith("/") and str(tmp_path) not in text and "upload-" not in text, text
