"""``ncservice keys create|list|revoke``: API keys of the service's database (``NCS_DATABASE_URL``).

The token is printed once, at creation; only its sha256 is stored (``db.keys``).
"""

from __future__ import annotations

import json

import typer

from ncservice.client_cli import example

app = typer.Typer(help="API keys: clients send 'Authorization: Bearer <key>'.", no_args_is_help=True)


def _sessionmaker():
    from db.session import make_engine, make_sessionmaker
    from ncservice.service import migrate_db
    from ncservice.settings import get_settings

    settings = get_settings()
    migrate_db(settings)  # idempotent: keys can be made before the first `ncservice serve`
    engine = make_engine(settings.resolved_database_url)
    return engine, make_sessionmaker(engine)


@app.command("create", epilog=example("ncservice keys create alice", "ncservice keys create ops --admin --json"))
def create(name: str = typer.Argument(..., help="who or what the key is for"),
           admin: bool = typer.Option(False, "--admin", help="the key sees every user's sweeps, jobs and uploads"),
           as_json: bool = typer.Option(False, "--json", help="print {id, name, admin, token} as JSON")) -> None:
    """Create a key and print its token (shown only this once)."""
    from db.keys import create_key

    engine, sm = _sessionmaker()
    try:
        with sm() as session:
            key, token = create_key(session, name=name, admin=admin)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps({"id": key.id, "name": key.name, "admin": key.admin, "token": token}))
        return
    typer.echo(f"created key {key.id} ({'admin' if admin else 'user'}) for {name!r}")
    typer.echo(f"token (store it now, it cannot be shown again): {token}")


@app.command("list", epilog=example("ncservice keys list"))
def list_(as_json: bool = typer.Option(False, "--json", help="print a JSON list")) -> None:
    """List keys (id, name, admin, token prefix, created, last used, revoked); never the tokens."""
    from db.keys import list_keys

    engine, sm = _sessionmaker()
    try:
        with sm() as session:
            rows = [{"id": k.id, "name": k.name, "admin": k.admin, "prefix": k.prefix,
                     "created_at": k.created_at.isoformat(),
                     "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None,
                     "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None}
                    for k in list_keys(session)]
    finally:
        engine.dispose()
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

    engine, sm = _sessionmaker()
    try:
        with sm() as session:
            key = revoke_key(session, key_id)
    except NotFound as exc:
        typer.echo(f"error: no API key {key_id!r}", err=True)
        raise typer.Exit(2) from exc
    finally:
        engine.dispose()
    typer.echo(f"revoked key {key.id} ({key.name!r}) at {key.revoked_at.isoformat()}")
