"""flower-focal's own ServerApp and ClientApp, importable from an installed wheel.

``strategies/server_app.py`` and ``clients/client_app.py`` (the checkout's Flower app) export
these; :func:`flower_focal.simulation.app_dir` writes a minimal app directory that points at
them when there is no checkout (``flower-focal simulate`` from ``pip install flower-focal``).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flower_focal.client.app import build_client_app

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one federated experiment: the strategy named by the run config."""
    from flower_focal.config import RunConfig
    from flower_focal.server import run_server

    run_server(grid, RunConfig.from_mapping(context.run_config), run_id=context.run_id)


def _library_logs_through_flower() -> None:
    """flower-focal's own logs (``flower_focal.*``: each institution's size and class
    histogram, data loading) go to Flower's handlers in flower-focal's own apps, so a
    SuperNode's log shows them next to Flower's. Someone else's app decides for itself."""
    import logging

    library, flower = logging.getLogger("flower_focal"), logging.getLogger("flwr")
    if not library.handlers:
        for handler in flower.handlers:
            library.addHandler(handler)
        library.setLevel(logging.INFO)  # still propagates: an app's own root handlers see it too


_library_logs_through_flower()
client_app = build_client_app()
