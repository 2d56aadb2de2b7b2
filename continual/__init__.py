"""Continual learning on Avalanche: AdaB2N, NaP, NMC, replay, the task streams and ``tta continual``."""
from tta._extras import require_installed

require_installed("avalanche", "the continual package (tta continual)")
