"""The calibration parameters: a torch-free module, so reading parameters imports no torch."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .data import TextSource


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: TextSource = Field(default_factory=lambda: TextSource(path="shared:wikitext-2/valid.txt"))
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(2048, ge=2)
    seed: int = 0
    # "wikitext": windows at random starts of the whole token stream (reference WikiText sampler);
    # "c4": a random document longer than seqlen, then a random window inside it (reference C4 sampler).
    sampler: Literal["wikitext", "c4"] = "wikitext"
