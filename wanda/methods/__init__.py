"""Pruning methods, one module each, behind one interface (``wanda.methods.base``).

Methods (registered in this order, which is the order error messages list them in):

- ``wanda``: |W| * ||X|| (Sun et al. 2023);
- ``magnitude``: |W|, no calibration;
- ``sparsegpt``: Hessian statistics and the OBS solver with weight updates (Frantar & Alistarh 2023);
- ``ria``: relative importance and activations, and its channel permutation for N:M (Zhang et al. 2024).

Recipes that compose with the score methods through the same interface:

- ``owl``: outlier-weighed layer-wise sparsity allocation (Yin et al. 2023);
- ``variant``: the Wanda variant, per-row adaptive sparsity by bisection (Sun et al. 2023, reference code);
- ``dsnot``: training-free mask refinement (Zhang et al. 2024);
- ``ria.permuted_mask``: the channel permutation for any score method.

Any other module placed in this package is imported too, so a new method is one new file that
subclasses ``Method`` and calls ``register``.
"""
import importlib
import pkgutil

# Registration order is the order error messages list the methods in.
from . import wanda  # noqa: F401,I001
from . import magnitude  # noqa: F401,I001
from . import sparsegpt  # noqa: F401,I001
from . import ria  # noqa: F401,I001
from .base import Layer, LayerResult, Method, ScoreMethod, get_method, method_names, register
from .dsnot import dsnot_refine, expected_error
from .owl import allocate_owl, outlier_ratio
from .ria import channel_permutation, retained_score
from .sparsegpt import HessianCollector, sparsegpt_prune
from .variant import variant_row_mask

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "HessianCollector", "Layer", "LayerResult", "Method", "ScoreMethod", "allocate_owl", "channel_permutation",
    "dsnot_refine", "expected_error", "get_method", "method_names", "outlier_ratio", "register", "retained_score",
    "sparsegpt_prune", "variant_row_mask",
]
