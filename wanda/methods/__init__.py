"""Pruning methods beyond plain Wanda that reuse its machinery.

- ``sparsegpt``: Hessian statistics and the OBS solver with weight updates (Frantar & Alistarh 2023);
- ``ria``: the channel permutation of RIA for N:M masks (the RIA score lives in ``wanda.scores``);
- ``owl``: outlier-weighed layer-wise sparsity allocation (Yin et al. 2023);
- ``variant``: the Wanda variant, per-row adaptive sparsity by bisection (Sun et al. 2023, reference code);
- ``dsnot``: training-free mask refinement (Zhang et al. 2024).

Each module works on one layer (or one list of block ratios) with plain tensors; ``wanda.prune``
wires them into the block-by-block walk according to ``PruneConfig``.
"""
from .dsnot import dsnot_refine, expected_error
from .owl import allocate_owl, outlier_ratio
from .ria import channel_permutation, retained_score
from .sparsegpt import HessianCollector, sparsegpt_prune
from .variant import variant_row_mask

__all__ = [
    "HessianCollector", "allocate_owl", "channel_permutation", "dsnot_refine", "expected_error", "outlier_ratio",
    "retained_score", "sparsegpt_prune", "variant_row_mask",
]
