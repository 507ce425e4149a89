"""Access and its record: ``users add|list|remove|rotate`` and ``audit verify|export``, on the
``auth.db`` / ``audit.db`` beside a served run (``--run``) or archive (``--archive``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from neurocbir.cli._common import _fail, _guard, resolve_run

users = typer.Typer(
    no_args_is_help=True, help="Users of the app and their API tokens (roles: reader, clinician, curator, admin)."
)
audit = typer.Typer(no_args_is_help=True, help="The audit trail: who saw what.")

RUN = typer.Option(None, help="the served run (auth.db and audit.db live in its folder)")
ARCHIVE = typer.Option(None, help="the served case archive (its folder holds auth.db and audit.db)")


def _folder(run: Optional[Path], archive: Optional[Path]) -> Path:
    if archive is not None:
        if not (archive / "archive.db").is_file():
            _fail(f"no case archive at {archive}")
        return archive
    folder = resolve_run(run)
    if not (folder / "config.json").is_file():
        _fail(f"{folder} is not a run directory")
    return folder


def _store(run: Optional[Path], archive: Optional[Path]):
    from neurocbir.app.users import UserStore

    return _guard(UserStore.beside, _folder(run, archive))


@users.command("add")
def users_add(
    name: str = typer.Argument(...),
    role: str = typer.Option(..., help="reader | clinician | curator | admin"),
    run: Optional[Path] = RUN,
    archive: Optional[Path] = ARCHIVE,
) -> None:
    """Add a user; their API token is the last line printed (shown once, only its hash is kept)."""
    token = _guard(_store(run, archive).add, name, role)
    typer.echo(f"user {name} ({role}) added; their API token, shown once:")
    typer.echo(token)


@users.command("rotate")
def users_rotate(name: str = typer.Argument(...), run: Optional[Path] = RUN, archive: Optional[Path] = ARCHIVE) -> None:
    """Give a user a new token (the old one stops working); the token is the last line printed."""
    token = _guard(_store(run, archive).rotate, name)
    typer.echo(f"user {name}: new API token, shown once (the old one no longer works):")
    typer.echo(token)


@users.command("remove")
def users_remove(name: str = typer.Argument(...), run: Optional[Path] = RUN, archive: Optional[Path] = ARCHIVE) -> None:
    """Remove a user (their token and sessions stop working)."""
    if not _store(run, archive).remove(name):
        _fail(f"no user {name!r}")
    typer.echo(f"user {name} removed")


@users.command("list")
def users_list(run: Optional[Path] = RUN, archive: Optional[Path] = ARCHIVE) -> None:
    """The users and their roles (tokens are never shown again)."""
    for u in _store(run, archive).list():
        typer.echo(
            f"{u['name']}\t{u['role']}\tadded {u['created']}" + (f", rotated {u['rotated']}" if u["rotated"] else "")
        )


KEY = typer.Option(None, help="the trail's key file (default: audit.key beside audit.db)")


def _log(run: Optional[Path], archive: Optional[Path], key: Optional[Path] = None):
    from neurocbir.app.audit import FILE, AuditError, AuditLog

    folder = _folder(run, archive)
    if not (folder / FILE).is_file():
        _fail(f"no audit trail in {folder} (it is kept while sign-in is on)")
    try:
        return AuditLog(folder / FILE, key, create_key=False)
    except AuditError as exc:
        _fail(str(exc))


@audit.command("verify")
def audit_verify(run: Optional[Path] = RUN, archive: Optional[Path] = ARCHIVE, key: Optional[Path] = KEY) -> None:
    """Check every row against the key and the newest-row anchor: exit code 1, with each edited or
    deleted row named, when the trail was tampered with."""
    verdict = _log(run, archive, key).verify()
    if not verdict.intact:
        typer.secho(f"the audit trail is broken ({verdict.rows} rows read):", fg="red", err=True)
        for problem in verdict.problems[:50]:
            typer.secho(f"  {problem}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"the audit trail is intact: {verdict.rows} rows")


@audit.command("export")
def audit_export(
    since: Optional[str] = typer.Option(None, help="from this UTC date or time (e.g. 2026-12-01)"),
    run: Optional[Path] = RUN,
    archive: Optional[Path] = ARCHIVE,
    key: Optional[Path] = KEY,
) -> None:
    """The audit trail as CSV on stdout."""
    typer.echo(_log(run, archive, key).export_csv(since), nl=False)
