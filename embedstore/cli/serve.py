"""`embedstore serve`: the search service and its page."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from embedstore.cli.options import StoreArgument
from embedstore.cli.render import out
from embedstore.sources.limits import UPLOAD_MAX_PIXELS


def serve(
    store: StoreArgument,
    host: str = typer.Option("127.0.0.1", help="Address to listen on; any but loopback needs --token."),
    port: int = typer.Option(8000, help="Port to listen on."),
    token: Optional[str] = typer.Option(None, envvar="EMBEDSTORE_TOKEN",
                                        help="Bearer token every API and thumbnail request must carry "
                                             "(or EMBEDSTORE_TOKEN, or --token-file: a token on the command line "
                                             "shows in `ps`); open the page as http://HOST:PORT/#token=..."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Read the token from this file (its first "
                                              "line)."),
    show_paths: bool = typer.Option(False, "--show-paths", help="Serve file paths and path-made ids as stored "
                                                                "(folder names can carry patient names)."),
    max_upload_mb: float = typer.Option(50.0, help="Largest query image accepted, in MB."),
    max_pixels: int = typer.Option(UPLOAD_MAX_PIXELS, help="Most values an uploaded frame may declare (refused from "
                                   "its header before decoding; ingest's --max-pixels, lower: a 16000² PNG would take "
                                   "4 GB to embed)."),
) -> None:
    """A search service and web page over the store: upload an image or paste a key, see similar slices,
    series or studies as thumbnails."""
    from embedstore.serve.app import ServeSettings, check_exposure, run_server, service_token
    from embedstore.store import Store

    token = service_token(token, token_file)
    check_exposure(host, token)
    settings = ServeSettings(store, token, show_paths, max_upload_mb, max_pixels)
    Store.open(store)  # a wrong path is a usage error before the server starts
    out.print(f"serving {store} on http://{'[' + host + ']' if ':' in host else host}:{port}/"
              + (" (token required)" if token else ""))
    run_server(settings, host, port)
