"""Compare tab: every chosen defense on the same model, clean budget and held-out images; one table and chart."""

from __future__ import annotations

import gradio as gr

from forensics.defenses import DEFENSES
from forensics.pipelines.compare import run_compare
from forensics.pipelines.report import comparison_chart, table_rows
from forensics.ui.common import cancel_flag, gr_progress, guarded, model_ref, new_job_dir, precision_choice

EXPLAIN = """**Compare** runs each chosen repair method on the same suspect model with the same clean budget (a seeded
share of the probe set's clean images) and measures all of them on the same held-out images: CA and ASR before and
after, samples used, time and peak memory. *oracle-finetune* uses the latest scan when there is one, otherwise it
scans the budget images first. On 2 CPU cores all methods on the demo take several minutes."""


@guarded
def compare(
    state: dict,
    methods: list[str],
    budget: float,
    precision: str = "fp32",
    request: gr.Request = None,
    progress=gr.Progress(),
) -> tuple:
    """Run the comparison for this session's model; the table, the chart and the files."""
    if not methods:
        raise gr.Error("choose at least one method", print_exception=False)
    stop = cancel_flag(request)
    stop.clear()
    out = new_job_dir("compare", request)
    report = run_compare(
        model_ref(state),
        methods,
        out,
        probe=state.get("probe") or "demo",
        budget=int(budget),
        findings=state.get("scan_dir"),
        progress=gr_progress(progress),
        should_stop=stop.is_set,
        precision=precision,
    )
    import pandas as pd

    flat, columns = table_rows(report)
    table = pd.DataFrame([[row[c] for c in columns] for row in flat], columns=columns)
    return (
        table,
        comparison_chart(report),
        [str(out / "compare.md"), str(out / "compare.json"), str(out / "report.html")],
    )


def build_compare_tab(state: gr.State) -> dict:
    """Components of the Compare tab, wired (shares the repair queue: one heavy job at a time)."""
    gr.Markdown(EXPLAIN)
    with gr.Row():
        methods = gr.CheckboxGroup(
            list(DEFENSES), value=[n for n in DEFENSES if n != "oracle-finetune"], label="Methods"
        )
        budget = gr.Slider(20, 250, value=120, step=10, label="Clean budget (images)")
        precision = precision_choice()
    run = gr.Button("Compare", variant="primary", elem_id="compare-button")
    table = gr.Dataframe(label="Comparison", interactive=False, elem_id="compare-table")
    chart = gr.Plot(label="After repair (bars) vs before (dashed)")
    files = gr.File(label="compare.md, compare.json, report.html", file_count="multiple", interactive=False)
    run.click(
        compare,
        [state, methods, budget, precision],
        [table, chart, files],
        api_name="compare",
        concurrency_limit=1,
        concurrency_id="repair",
    )
    return {"methods": methods}
