"""legacyapp: a Flower / PyTorch app on the legacy API."""
