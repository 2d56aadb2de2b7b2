"""The built-in methods; importing this package registers them, in the order tables list them."""
from tta.methods import source, norm, alpha_bn, core, cafa, tent, cotta, rotta  # noqa: F401,I001  (registration order)
