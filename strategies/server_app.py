"""Flower ServerApp of flower-focal: picks the strategy named by the run config and runs it.

The app lives in the library (:mod:`flower_focal.apps`; all logic in
:func:`flower_focal.server.run_server`); this file only exposes it to Flower.
"""

from flower_focal.apps import server_app as app

__all__ = ["app"]
