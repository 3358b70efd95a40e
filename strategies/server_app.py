"""Flower ServerApp of flower-focal: picks the strategy named by the run config and runs it.

All logic lives in :func:`flower_focal.server.run_server`.
"""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flower_focal.config import RunConfig
from flower_focal.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one federated experiment."""
    run_server(grid, RunConfig.from_mapping(context.run_config), run_id=context.run_id)
