"""flower-focal: privacy-preserving federated learning for medical imaging on Flower."""

__version__ = "0.1.0"
