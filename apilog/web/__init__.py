"""`apilog web`: read-only pages and a JSON API over the log tree, for holders of the token."""

from __future__ import annotations

import ipaddress

import click

from apilog.settings import Settings


def serve(settings: Settings, host: str, port: int) -> None:
    """Print the URL with the token, then serve until interrupted."""
    import uvicorn

    from .app import create_app
    from .auth import token_for

    token = token_for(settings)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        click.echo(f"apilog web: warning: listening on {host}, beyond this machine; the token is all that guards it",
                   err=True)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"apilog web: http://{shown}:{port}/?token={token}", err=True)
    uvicorn.run(create_app(settings, token), host=host, port=port, log_level="warning", server_header=False,
                access_log=False)
