"""Command-line interface: ``neurocbir COMMAND`` (``neurocbir --help`` lists them).

One module per command group (:mod:`.training`, :mod:`.archive`, :mod:`.querying`,
:mod:`.reports`). Each command imports what it needs when it runs, so ``--help`` stays fast."""

from __future__ import annotations

import typer

from neurocbir.cli import admin, archive, querying, reports, training

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="neurocbir: retrieval-based brain tumor MRI decision support (not a diagnosis).",
)
COMMANDS = {
    "info": training.info,
    "train": training.train,
    "search": training.search,
    "evaluate": training.evaluate,
    "calibrate": training.calibrate,
    "index": training.index,
    "presence-decoder": training.presence_decoder,
    "add": archive.add,
    "remove": archive.remove,
    "query": querying.query,
    "query-study": querying.query_study,
    "ask": querying.ask,
    "serve": querying.serve,
    "demo": querying.demo,
    "summarize": reports.summarize,
    "answer": reports.answer,
    "write-reports": reports.write_reports,
    "eval-reports": reports.eval_reports,
}
for name, command in COMMANDS.items():
    app.command(name)(command)
app.add_typer(admin.users, name="users")
app.add_typer(admin.audit, name="audit")
