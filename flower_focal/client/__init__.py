"""Institution-side code: message handlers, HE/DP mods and the ClientApp wiring (``app.py``).

For any Flower app: :func:`flower_focal.client.he_mod.he_fedavg_mod` (HE-FedAvg),
:func:`flower_focal.client.focal.register_focal` (FOCAL with the app's own network and data)
and :func:`flower_focal.client.handlers.describe_handler` (optional partition order).
"""
