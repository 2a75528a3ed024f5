"""CLIP backdoor forensics: scan a suspect CLIP for a backdoor, explain what it looks at, repair it.

The public API, one call per action (the CLI and the Gradio workbench call the same functions)::

    import forensics
    model = forensics.load_model("demo")
    forensics.evaluate("demo")                                  # CA, and ASR of the demo's planted trigger
    forensics.scan(forensics.ModelRef("demo"), "out/scan")      # flagged labels, triggers, victims, report
    forensics.scan_many(["demo", "demo-clean"], "demo", "out/zoo")  # zoo audit: one verdict per model (resumable)
    forensics.repair("demo", "out/scan", "out/repair")          # oracle-guided fine-tuning, CA/ASR before/after
    forensics.compare("demo", "all", "out/compare")             # every defense on one clean budget
    forensics.audit("data.csv", "demo", reference="demo-clean")  # SafeCLIP data-set audit

Layers (each imports only those below it): ``core`` -> ``attacks``, ``oracles``, ``attribution`` ->
``training`` -> ``detect`` -> ``defenses`` -> ``pipelines`` -> ``cli``, ``ui``. Names load lazily, so
``import forensics`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "ModelRef": ("forensics.core.models", "ModelRef"),
    "load_model": ("forensics.core.models", "load_model"),
    "evaluate": ("forensics.pipelines.evaluate", "evaluate_model"),
    "scan": ("forensics.pipelines.scan", "run_scan"),
    "scan_many": ("forensics.pipelines.scan_many", "scan_many"),
    "repair": ("forensics.pipelines.repair", "run_repair"),
    "compare": ("forensics.pipelines.compare", "run_compare"),
    "audit": ("forensics.pipelines.audit", "audit_dataset"),
    "implant": ("forensics.pipelines.implant", "implant"),
    "explain_image": ("forensics.pipelines.explain", "explain_image"),
    "ForensicsError": ("forensics.core.errors", "ForensicsError"),
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    """Load a public name on first use (PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 'forensics' has no attribute {name!r}")
    module, attribute = _API[name]
    return getattr(importlib.import_module(module), attribute)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
