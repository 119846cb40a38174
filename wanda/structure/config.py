"""Typed configuration of structured pruning: what whole parts of the model to remove.

Every field is off by default; a default ``StructureConfig`` removes nothing, and
``apply_structure`` then returns the model unchanged without a forward pass.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StructureConfig(BaseModel):
    """Structured pruning settings (the ``structure:`` section of a pipeline).

    - ``experts_removed``: fraction of each MoE layer's routed experts removed (rounded down per
      layer; 0 = off). Experts are ranked by ``expert_saliency``:
      ``reap`` (router-weighted expert activation norm, Lasby et al. 2026: mean over the tokens
      routed to the expert of its top-k gate value renormalised over the token's k slots times
      the L2 norm of the expert's output), ``frequency`` (tokens routed to it) or ``gate`` (sum
      of the same renormalised gate values over its routed tokens). The lowest are removed.
    - ``expert_allocation``: ``uniform`` removes the same number of experts in every MoE layer.
      It is the only rule: every supported family stores one expert count in its config, so a
      per-layer count would not load as a standard checkpoint of the family.
    - ``mlp_channels_removed``: fraction of every dense MLP's intermediate channels removed
      (the same count in every layer, rounded down).
    - ``kv_groups_removed``: key/value head groups removed per layer (a KV head and the query
      heads that share it; one head each without grouped-query attention).
    - ``width_score``: ``wanda`` (FLAP's structured Wanda baseline: mean over output rows of
      ``|W_ij| * ||X_j||_2`` of the output projection, summed over a head group's channels) or
      ``flap`` (FLAP's fluctuation: ``Var(X_j) * ||W_:,j||^2``, summed the same way), both on the
      inputs of ``down_proj``/``o_proj`` (GPT-2: ``mlp.c_proj``/``attn.c_proj``).
    - ``bias_compensation`` (``flap`` only): fold the removed channels' mean contribution
      ``W[:, removed] @ mean(X[removed])`` into the output projection's bias, adding a bias where
      the family's config can (Llama ``mlp_bias``/``attention_bias``); a family whose config
      cannot is refused by name unless this is ``False``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    experts_removed: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of each MoE layer's experts")
    expert_saliency: Literal["reap", "frequency", "gate"] = "reap"
    expert_allocation: Literal["uniform"] = "uniform"
    mlp_channels_removed: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of MLP intermediate channels")
    kv_groups_removed: int = Field(0, ge=0, description="key/value head groups removed per layer")
    width_score: Literal["wanda", "flap"] = "wanda"
    bias_compensation: bool = True

    @property
    def removes_experts(self) -> bool:
        return self.experts_removed > 0

    @property
    def removes_width(self) -> bool:
        return self.mlp_channels_removed > 0 or self.kv_groups_removed > 0

    @property
    def enabled(self) -> bool:
        return self.removes_experts or self.removes_width

    @property
    def compensates(self) -> bool:
        return self.width_score == "flap" and self.bias_compensation
