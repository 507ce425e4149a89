"""Reports: ``summarize``, ``answer``, ``write-reports``, ``eval-reports``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from neurocbir.cli._common import _explain, _explainer, _guard


def summarize(
    report: list[str] = typer.Option(..., "--report", help="a retrieved report (repeat, in retrieval order)"),
    query_report: Optional[str] = typer.Option(None, help="the query scan's report"),
    as_json: bool = typer.Option(False, "--json"),
    llm: bool = typer.Option(False, help="phrase with the configured LLM"),
    mode: str = typer.Option("grounded", help="grounded | paper (LLM only)"),
) -> None:
    """Summarise retrieved reports: modality, technique, tumor types, sizes, planes."""
    out = _explain(llm, mode, "summarize", report, query_report)
    typer.echo(json.dumps({"summary": out["summary"], "facts": out["facts"]}, indent=2) if as_json else out["summary"])


def answer(
    question: str = typer.Option(..., help="a question about the retrieved reports"),
    report: list[str] = typer.Option(..., "--report", help="a retrieved report (repeat, in retrieval order)"),
    query_report: Optional[str] = typer.Option(None, help="the query scan's report"),
    as_json: bool = typer.Option(False, "--json"),
    llm: bool = typer.Option(False, help="phrase with the configured LLM"),
    mode: str = typer.Option("grounded", help="grounded | paper (LLM only)"),
) -> None:
    """Answer a question about retrieved reports (grounded: numbers computed, never guessed)."""
    ans, _ = _explain(llm, mode, "answer", question, report, query_report)
    typer.echo(json.dumps(ans.as_dict(), indent=2) if as_json else ans.answer)


def eval_reports(
    run: Optional[Path] = typer.Option(None, help="take query sets from this trained run's index"),
    n_sets: int = typer.Option(50),
    llm: bool = typer.Option(False),
    mode: str = typer.Option("grounded"),
    json_out: Optional[Path] = typer.Option(None, "--json"),
    data: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_DATA"),
) -> None:
    """The paper's Fig. 4: summary accuracy / completeness and Q&A accuracy per report style."""
    from neurocbir.data.cases import load_cases
    from neurocbir.reports.evaluation import evaluate_reports, query_sets

    table = _guard(load_cases, data)
    result = _guard(evaluate_reports, table, query_sets(table, n_sets, run=run), _explainer(llm, mode))
    doc = {"mode": mode if llm else "grounded", "backend": "llm" if llm else "none", "styles": result}
    if json_out:
        json_out.write_text(json.dumps(doc, indent=2))
    typer.echo(json.dumps(doc, indent=2))


def write_reports(
    limit: Optional[int] = typer.Option(None, help="only the first N cases (each is one LLM call)"),
    data: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_DATA"),
) -> None:
    """Have the configured LLM write the normal-style reports (checked, cached, resumable)."""
    from tqdm import tqdm

    from neurocbir.data.cases import load_cases
    from neurocbir.reports.llm import llm_from_env
    from neurocbir.reports.text import llm_normal_reports, llm_reports_path

    llm = _guard(llm_from_env)
    table = _guard(load_cases, data)
    rows = [r for r in range(len(table) if limit is None else min(limit, len(table))) if table.plane[r]]
    path = llm_reports_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    out = llm_normal_reports(table, llm, path, rows=tqdm(rows, desc="LLM reports", unit="case"))
    typer.echo(f"{len(out)} normal reports cached in {path}")
