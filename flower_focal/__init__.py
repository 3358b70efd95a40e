"""flower-focal: privacy-preserving federated learning for medical imaging on Flower."""

import time as _time

IMPORT_STARTED = _time.time()  # when this process first imported flower-focal (client/timing.py)
__version__ = "0.1.0"
