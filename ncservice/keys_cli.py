"""``ncservice keys create|list|revoke``: API keys of the service's database (``NCS_DATABASE_URL``).

The token is printed once, at creation; only its sha256 is stored (``db.keys``). Every subcommand says on
stderr which database it used (password masked), since keys made in another database than the service's are
never seen by it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ncservice.client_cli import example

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

app = typer.Typer(help="API keys: clients send 'Authorization: Bearer <key>'.", no_args_is_help=True)


def database_label(url: str) -> str:
    """The database URL as shown to the user: any password masked (``***``)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparseable database URL>"


def _sqlite_file(url: str) -> Path | None:
    """The file of a file-backed SQLite URL, else None."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if not parsed.get_backend_name() == "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


@contextmanager
def _session() -> Iterator[Session]:
    """A session of the settings' database (migrated first). Says on stderr which database it is (password
    masked), and when it did not exist before (a new ./ncs-data made by running in another folder than the
    service). A database that cannot be opened is one ``error:`` line and exit code 2."""
    from sqlalchemy.exc import SQLAlchemyError

    from db.session import make_engine, make_sessionmaker
    from ncservice.service import migrate_db
    from ncservice.settings import get_settings

    settings = get_settings()
    url = settings.resolved_database_url
    label = database_label(url)
    sqlite_file = _sqlite_file(url)
    new = sqlite_file is not None and not sqlite_file.exists()
    engine = None
    try:
        migrate_db(settings)  # idempotent: keys can be made before the first `ncservice serve`
        note = (" (new: it did not exist and was created now; the service must use the same NCS_DATA_DIR / "
                "NCS_DATABASE_URL to see these keys)") if new else ""
        typer.echo(f"database: {label}{note}", err=True)
        engine = make_engine(url)
        with make_sessionmaker(engine)() as session:
            yield session
    except (SQLAlchemyError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or getattr(exc, "strerror", None) or exc).strip().splitlines()
        typer.echo(f"error: database {label}: {reason[0] if reason else type(exc).__name__} "
                   "(set NCS_DATA_DIR or NCS_DATABASE_URL to the service's)", err=True)
        raise typer.Exit(2) from exc
    finally:
        if engine is not None:
            engine.dispose()


@app.command("create", epilog=example("ncservice keys create alice", "ncservice keys create ops --admin --json"))
def create(name: str = typer.Argument(..., help="who or what the key is for"),
           admin: bool = typer.Option(False, "--admin", help="the key sees every user's sweeps, jobs and uploads"),
           as_json: bool = typer.Option(False, "--json", help="print {id, name, admin, token} as JSON")) -> None:
    """Create a key and print its token (shown only this once)."""
    from db.keys import create_key, list_keys

    if not name.strip():
        typer.echo("error: NAME: must not be empty", err=True)
        raise typer.Exit(2)
    with _session() as session:
        same = [k for k in list_keys(session) if k.name.strip() == name.strip()]
        if same:
            ids = ", ".join(f"{k.id}{' revoked' if k.revoked_at else ''}" for k in same)
            typer.echo(f"warning: {len(same)} key(s) named {name!r} already exist ({ids}); creating another",
                       err=True)
        key, token = create_key(session, name=name, admin=admin)
    if as_json:
        typer.echo(json.dumps({"id": key.id, "name": key.name, "admin": key.admin, "token": token}))
        return
    typer.echo(f"created key {key.id} ({'admin' if admin else 'user'}) for {name!r}")
    typer.echo(f"token (store it now, it cannot be shown again): {token}")


@app.command("list", epilog=example("ncservice keys list"))
def list_(as_json: bool = typer.Option(False, "--json", help="print a JSON list")) -> None:
    """List keys (id, name, admin, token prefix, created, last used, revoked); never the tokens."""
    from db.keys import list_keys

    with _session() as session:
        rows = [{"id": k.id, "name": k.name, "admin": k.admin, "prefix": k.prefix,
                 "created_at": k.created_at.isoformat(),
                 "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None,
                 "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None}
                for k in list_keys(session)]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for r in rows:
        state = f"revoked {r['revoked_at']}" if r["revoked_at"] else "active"
        typer.echo(f"{r['id']}  {r['prefix']}...  {'admin' if r['admin'] else 'user '}  {state:<40}  {r['name']}")


@app.command("revoke", epilog=example("ncservice keys list   # the ID column", "ncservice keys revoke 7c1e..."))
def revoke(key_id: str = typer.Argument(..., help="the key's id (see `ncservice keys list`)")) -> None:
    """Revoke a key at once (idempotent); its sweeps and jobs stay, visible to admins."""
    from db.errors import NotFound
    from db.keys import revoke_key

    with _session() as session:
        try:
            key = revoke_key(session, key_id)
        except NotFound as exc:
            typer.echo(f"error: no API key {key_id!r}", err=True)
            raise typer.Exit(2) from exc
    typer.echo(f"revoked key {key.id} ({key.name!r}) at {key.revoked_at.isoformat()}")
