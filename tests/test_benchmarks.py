"""The benchmark scripts' bookkeeping that a fresh checkout relies on (no runs/ there)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cpu_recipe  # noqa: E402  (a broken benchmark import fails here, never skips)


def test_cpu_recipe_finds_every_candidate_in_the_results_doc():
    """benchmarks/cpu_recipe.py rebuilds its section from the rows docs/results.md recorded when a
    candidate's run is not on the machine: every candidate must be found there, with its figures,
    and exactly one of them is the choice, whose test fold was read."""
    rows = cpu_recipe.recorded_rows(5)
    for spec in cpu_recipe.CANDIDATES:
        row = rows[cpu_recipe.run_name(spec, 5)]
        encoder, size, epochs, _, stride = cpu_recipe.parse(spec)
        assert (row["encoder"], row["size"], row["epochs"], row["stride"]) == (encoder, size, epochs, stride)
        assert 0.5 < row["kappa"] <= 1 and row["n"] > 100
        assert 0 < row["area"] < 1 and 10 < row["minutes"] < 60
        assert row["run"] is None and row["trained"].startswith("20")
    chosen = [r for name, r in rows.items() if name != "ensemble" and r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["test"]
    accuracy, kappa, auroc = (float(x) for x in chosen[0]["test"].split(" / "))
    assert 0.8 < accuracy <= 1 and 0.7 < kappa <= 1 and 0.9 < auroc <= 1
    # every choice's test-fold table is kept, a former one's too, and says the same accuracy as its row
    for row in (r for name, r in rows.items() if name != "ensemble" and r["test"]):
        table = "\n".join(row["test_table"])
        assert "query tumor area" in table and f"| NIR accuracy | {row['test'].split(' / ')[0]} |" in table
    assert rows["ensemble"].startswith("| ensemble of the two best") and rows["ensemble"].count("|") == 10


def test_cpu_recipe_time_is_the_median_of_every_measurement(tmp_path):
    """A candidate timed several times (the machine is noisy) is judged on the median, counting the
    times recorded before its run existed on this machine."""
    run = tmp_path / "run"
    run.mkdir()
    cpu_recipe.record_timing(run, walls_s=[1650.0], trained="2026-11-27")
    assert cpu_recipe.minutes(run) == pytest.approx(27.5)
    cpu_recipe.record_timing(run, earlier_min=[32.4])
    cpu_recipe.record_timing(run, walls_s=[1650.0, 1680.0])
    assert cpu_recipe.minutes(run) == pytest.approx(28.0)
    assert cpu_recipe.timings(run)["trained"] == "2026-11-27"


def test_lesion_results_carries_the_recorded_gpu_rows_unchanged():
    """benchmarks/lesion_results.py --keep-recorded rebuilds the GPU table from the rows
    docs/results.md recorded (the runs' summary.json files stay on the machines that ran them):
    every (run, fold) row is found, and written again it reads exactly as before."""
    import lesion_results

    body = lesion_results.read_section("lesion")
    records = lesion_results.recorded_records(body)
    assert {r["fold"] for r in records} == {"1", "2", "3", "4", "5"}
    assert any(r["fold"] == "5" and r["run"] == "a" and r["trials"] == 5 for r in records)
    written = lesion_results.device_table(records)
    row_lines = [
        line for line in body.splitlines() if line.startswith("| ") and line[2:3].isalpha() and line[3:4] == " "
    ]
    assert written[2:-1] == row_lines  # one row per record, in the document's order, digit for digit
    # the mean row takes each fold's first run with the most trials, never the better score
    mean_row = written[-1]
    assert mean_row.startswith("| mean of 5 folds (") and mean_row in body
    for fold in "12345":
        most = max(r["trials"] for r in records if r["fold"] == fold)
        first = min(r["run"] for r in records if r["fold"] == fold and r["trials"] == most)
        assert f"{fold}: {first}" in mean_row


def test_lesion_results_says_which_runs_were_compiled(tmp_path):
    """A run trained through torch.compile (recipe.py --compile) says so in its sentence, and
    a fold merged from several leases says which lease's trials were compiled."""
    import lesion_results

    job = {"date": "2026-11-28", "device": "NVIDIA H100 80GB HBM3", "folds": ["2"], "seconds": 300.0}
    path = tmp_path / "job1" / "summary.json"
    assert "torch.compile" not in lesion_results.run_sentence("f", [job], [path])
    assert "trained through `torch.compile`" in lesion_results.run_sentence("f", [{**job, "compiled": True}], [path])
    leases = [
        {"date": "2026-11-27", "seeds": [0, 1], "compiled": False},
        {"date": "2026-11-28", "seeds": [2, 3, 4], "compiled": True},
    ]
    merged = lesion_results.run_sentence("g", [{**job, "merged_from": leases}], [path])
    assert "seeds 0,1 on 2026-11-27; seeds 2,3,4 on 2026-11-28 (compiled)" in merged


def test_cpu_folds_record_keeps_folds_across_sessions_and_refuses_another_recipe(tmp_path):
    """A fold measured in one session stays in the record for the next (a session keeps no run); the
    same fold measured again replaces its row; a run of another recipe is refused, not mixed in."""
    import cpu_folds

    record = tmp_path / "folds" / "cpu.json"
    recipe = {"encoder": "mobilenetv2", "epochs": 16, "intensity": "minmax"}
    assert [f["fold"] for f in cpu_folds.recorded(record, [{"fold": 4, "kappa": 0.88}], recipe)] == [4]
    rows = cpu_folds.recorded(record, [{"fold": 1, "kappa": 0.91}, {"fold": 4, "kappa": 0.90}], recipe)
    assert [(f["fold"], f["kappa"]) for f in rows] == [(1, 0.91), (4, 0.90)]
    with pytest.raises(SystemExit, match="another recipe.*intensity"):
        cpu_folds.recorded(record, [{"fold": 2, "kappa": 0.9}], {**recipe, "intensity": "head"})
    assert [f["fold"] for f in json.loads(record.read_text())["folds"]] == [1, 4]  # the refused row is not kept
