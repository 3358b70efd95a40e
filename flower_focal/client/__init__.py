"""Institution-side code: message handlers, HE/DP mods and the ClientApp wiring (``app.py``)."""
