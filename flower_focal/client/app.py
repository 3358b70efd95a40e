"""The flower-focal ClientApp: one institution, every strategy.

:func:`build_client_app` wires the library's handlers and mods to a Flower ``ClientApp``;
``clients/client_app.py`` (the app ``flwr run`` loads) and the privacy audit use it, so there
is one wiring. The HE mod decrypts/encrypts around the same handlers under he-fedavg and
passes every other strategy's messages through untouched; FOCAL's actions (``train.embed``,
``train.focal``, ``evaluate.focal``) go to :mod:`flower_focal.client.focal`.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flower_focal import wire
from flower_focal.client import focal, handlers
from flower_focal.client.dp import dp_clipping_mod
from flower_focal.client.he_mod import he_fedavg_mod
from flower_focal.client.timing import message_timing_mod


def build_client_app() -> ClientApp:
    """A new ``ClientApp`` with flower-focal's handlers and mods."""
    app = ClientApp(mods=[message_timing_mod])

    @app.query(wire.ACTION_DESCRIBE)
    def describe(message: Message, context: Context) -> Message:
        """Tell the server this institution's partition id and data shape."""
        return handlers.describe(message, context)

    @app.train(mods=[he_fedavg_mod, dp_clipping_mod])
    def train(message: Message, context: Context) -> Message:
        """Local training round."""
        return handlers.train(message, context)

    @app.evaluate(mods=[he_fedavg_mod])
    def evaluate(message: Message, context: Context) -> Message:
        """Federated evaluation on the institution's own validation split."""
        return handlers.evaluate(message, context)

    @app.train("embed")
    def focal_embed(message: Message, context: Context) -> Message:
        """FOCAL, round 1: encrypted embeddings (and the initial head when asked)."""
        return focal.embed(message, context)

    @app.train("focal")
    def focal_step(message: Message, context: Context) -> Message:
        """FOCAL, every step: own encrypted logits in, encrypted error out."""
        return focal.step(message, context)

    @app.evaluate("focal")
    def focal_evaluate(message: Message, context: Context) -> Message:
        """FOCAL: decrypt the head and evaluate on the own validation split."""
        return focal.evaluate(message, context)

    return app
