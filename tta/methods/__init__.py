"""The built-in methods; importing this package registers them, in the order tables list them."""
from tta.methods import (  # noqa: F401,I001  (registration order)
    source, norm, alpha_bn, core, cafa, tent, bn_ema, eta, eata, sar, cotta, rotta, lame, roid, deyo, rdumb, t3a,
    shot_im, memo)
