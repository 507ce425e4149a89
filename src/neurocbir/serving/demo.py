"""The archive `neurocbir demo` serves, built on its first start from the bundled data with the
served run's encoder (no training):

* cases: the run's training folds of the figshare dataset, and the development part of the
  other hospitals' slices (tumor types and slices without a tumor) when that folder is present;
* examples to try (stored beside the cases, never searched): the run's test fold, and the
  other hospitals' validation part.

So the demo answers the four ways the app can ("no similar case", "no tumor found", a tumor
type, with its set) and every example is a patient or group the run and the archive never saw.
The build goes through `neurocbir add` (resumable: a killed first start finishes on the next)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from neurocbir.data.cases import default_data_dir, load_cases
from neurocbir.data.external import EXTERNAL_ENV, default_external_dir
from neurocbir.files import write_json

DONE = "demo.json"


def demo_archive(run: Path, root: Path | None = None, say: Callable[[str], None] = print, batch_size: int = 32) -> Path:
    """The demo's archive for ``run`` (default: ``RUN/demo-archive``), built if not yet complete."""
    from neurocbir.retrieval.ingest import ingest

    root = Path(root) if root is not None else Path(run) / "demo-archive"
    if (root / DONE).is_file():
        return root
    config = json.loads((Path(run) / "config.json").read_text())
    data = Path(config["data"]) if config.get("data") else default_data_dir()
    table = load_cases(data)
    folds = sorted(set(table.fold.tolist()))
    train, test = [f for f in folds if f != config["fold"]], [config["fold"]]
    external = default_external_dir(data)
    parts: list[tuple[str, dict]] = [
        (f"the dataset's folds {train} (those the run learned from)", {"folder": data, "folds": train}),
        (f"the dataset's test fold {test[0]} as examples", {"folder": data, "folds": test, "as_examples": True}),
    ]
    if external is not None:
        parts += [
            ("other hospitals' slices: the development part", {"folder": external, "part": "development"}),
            (
                "other hospitals' slices: the validation part as examples",
                {"folder": external, "part": "validation", "as_examples": True},
            ),
        ]
    else:
        say(
            f"  (no other hospitals' slices found: set {EXTERNAL_ENV}; without slices that show no tumor, tumor presence is not assessed)"
        )
    say(f"First start: indexing the bundled data with {run} into the demo archive {root} (a few minutes, once)...")
    for what, kwargs in parts:
        folder = kwargs.pop("folder")
        out = ingest(folder, root, run, batch_size=batch_size, **kwargs)
        say(f"  {what}: {out['added']} added ({out['total']} cases in the archive)")
        if out["errors"]:
            say(f"  skipped {len(out['errors'])} unreadable files, e.g. {out['errors'][0]}")
    write_json(root / DONE, {"run": str(run), "data": str(data), "external": str(external) if external else None})
    return root
