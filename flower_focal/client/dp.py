"""Client-side clipping for Flower's DP wrappers, only when the server asks for it.

Flower's ``fixedclipping_mod`` answers with an error when the message carries no clipping
norm, so it cannot sit on a ClientApp that also serves strategies without DP. This mod
applies it exactly when the server's config carries the clipping norm
(``DifferentialPrivacyClientSideFixedClipping`` puts it there) and is a pass-through otherwise.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from flower_focal import wire
from flower_focal._compat import KEY_CLIPPING_NORM


def dp_clipping_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the update with Flower's ``fixedclipping_mod`` when the server asked for DP."""
    config = message.content.config_records.get(wire.CONFIG)
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(message, context, call_next)
    return call_next(message, context)
