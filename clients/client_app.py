"""Flower ClientApp of flower-focal: one institution.

All logic lives in the library (:mod:`flower_focal.apps` wires the handlers of
:mod:`flower_focal.client.handlers` and :mod:`flower_focal.client.focal` with the HE and DP
mods); this file only exposes it to Flower.
"""

from flower_focal.apps import client_app as app

__all__ = ["app"]
