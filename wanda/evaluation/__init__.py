"""Evaluation: WikiText perplexity and zero-shot accuracy (lm-eval), result records, reports."""
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
