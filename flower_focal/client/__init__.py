"""Institution-side message handlers used by ``clients/client_app.py``."""
