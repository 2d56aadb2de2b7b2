"""continual"""
import tta._compat  # noqa: F401  (must run before torchvision / avalanche / robustbench are imported)
