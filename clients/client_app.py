"""Flower ClientApp of flower-focal: one institution.

All logic lives in :mod:`flower_focal.client.handlers`; this file only wires it to Flower.
The HE mod decrypts/encrypts around the same handlers under he-fedavg and passes every other
strategy's messages through untouched.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flower_focal.client import handlers
from flower_focal.client.he_mod import he_fedavg_mod

app = ClientApp()


@app.query()
def describe(message: Message, context: Context) -> Message:
    """Tell the server this institution's partition id and data shape."""
    return handlers.describe(message, context)


@app.train(mods=[he_fedavg_mod])
def train(message: Message, context: Context) -> Message:
    """Local training round."""
    return handlers.train(message, context)


@app.evaluate(mods=[he_fedavg_mod])
def evaluate(message: Message, context: Context) -> Message:
    """Federated evaluation on the institution's own validation split."""
    return handlers.evaluate(message, context)
