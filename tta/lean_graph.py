"""Deprecated path of :mod:`tta.accel.lean_graph` (removed in tta 0.3)."""
from tta.accel import deprecated_module

deprecated_module("tta.lean_graph", "tta.accel.lean_graph")
from tta.accel import LEAN_GRAPH_MIN_INPUT_ELEMENTS as AUTO_MIN_INPUT_ELEMENTS  # noqa: F401,E402
from tta.accel.lean_graph import *  # noqa: F401,F403,E402
from tta.accel.lean_graph import outside_lean_graph  # noqa: F401,E402
