"""Evaluation: WikiText perplexity and zero-shot accuracy (lm-eval), result records, reports.

Names are imported on first use (:mod:`wanda.lazy`): the configs read no torch.
"""
from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:  # the same names, for type checkers and the stage code closure (tasks/imports.py)
    from .perplexity import PerplexityConfig, PerplexityResult, evaluate_perplexity
    from .report import comparison_plot, comparison_table
    from .results import (
        EvaluationResult,
        cached_or_run,
        evaluation_settings,
        load_result,
        make_result,
        run_evaluation,
        save_result,
    )
    from .zeroshot import PAPER_TASKS, ZeroShotConfig, ZeroShotResult, TaskScore, evaluate_zeroshot

_EXPORTS = {
    ".perplexity": ("PerplexityConfig", "PerplexityResult", "evaluate_perplexity"),
    ".report": ("comparison_plot", "comparison_table"),
    ".results": ("EvaluationResult", "cached_or_run", "evaluation_settings", "load_result", "make_result",
                 "run_evaluation", "save_result"),
    ".zeroshot": ("PAPER_TASKS", "ZeroShotConfig", "ZeroShotResult", "TaskScore", "evaluate_zeroshot"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "PAPER_TASKS",
    "EvaluationResult",
    "PerplexityConfig",
    "PerplexityResult",
    "TaskScore",
    "ZeroShotConfig",
    "ZeroShotResult",
    "cached_or_run",
    "comparison_plot",
    "comparison_table",
    "evaluate_perplexity",
    "evaluate_zeroshot",
    "evaluation_settings",
    "load_result",
    "make_result",
    "run_evaluation",
    "save_result",
]
