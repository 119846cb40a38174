"""2:4 export and inference-speed measurement.

- :mod:`.sparse24`: 2:4 compliance checks and an exact compressed representation (CPU).
- :mod:`.trtllm_checkpoint`: TensorRT-LLM checkpoint writer/validator for LLaMA-family models (CPU).
- :mod:`.engine`: ``trtllm-build`` command lines, subprocess/container runner, sparse-tactic log parser.
- :mod:`.bench_trtllm`: token dataset, ``trtllm-bench`` commands, report parser, sparse/dense ratios.
- :mod:`.semistructured`: PyTorch semi-structured sparsity benchmark (CUDA, compute capability >= 8.0).

Nothing here imports TensorRT-LLM: its tools run as subprocesses (on the PATH or in a container).

Names are imported on first use (:mod:`wanda.lazy`): the engine settings read no torch.
"""
from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:  # the same names, for type checkers and the stage code closure (tasks/imports.py)
    from .bench_trtllm import (
        BenchmarkReport,
        BenchResult,
        TokenDatasetSpec,
        bench_command,
        compare,
        parse_report_json,
        parse_report_text,
        run_benchmarks,
        write_token_dataset,
    )
    from .engine import (
        EngineBuildError,
        EngineBuildReport,
        EngineShapes,
        EngineUnavailableError,
        ToolRunner,
        build_commands,
        build_engines,
        docker_prefix,
        parse_sparsity_log,
    )
    from .semistructured import (
        SemiStructuredResult,
        SemiStructuredUnavailableError,
        benchmark_semistructured,
        require_semistructured_support,
        select_semistructured_layers,
    )
    from .sparse24 import (
        ComplianceReport,
        LayerCompliance,
        Not24SparseError,
        bitwise_equal,
        canonicalize_zeros,
        check_24,
        compliance_report,
        compress_24,
        decompress_24,
    )
    from .trtllm_checkpoint import (
        CheckpointError,
        ExportResult,
        TrtllmCheckpointConfig,
        export_trtllm_checkpoint,
        read_checkpoint_config,
        validate_checkpoint,
    )

_EXPORTS = {
    ".bench_trtllm": (
        "BenchmarkReport", "BenchResult", "TokenDatasetSpec", "bench_command", "compare",
        "parse_report_json", "parse_report_text", "run_benchmarks", "write_token_dataset",
    ),
    ".engine": (
        "EngineBuildError", "EngineBuildReport", "EngineShapes", "EngineUnavailableError", "ToolRunner",
        "build_commands", "build_engines", "docker_prefix", "parse_sparsity_log",
    ),
    ".semistructured": (
        "SemiStructuredResult", "SemiStructuredUnavailableError", "benchmark_semistructured",
        "require_semistructured_support", "select_semistructured_layers",
    ),
    ".sparse24": (
        "ComplianceReport", "LayerCompliance", "Not24SparseError", "bitwise_equal", "canonicalize_zeros",
        "check_24", "compliance_report", "compress_24", "decompress_24",
    ),
    ".trtllm_checkpoint": (
        "CheckpointError", "ExportResult", "TrtllmCheckpointConfig", "export_trtllm_checkpoint",
        "read_checkpoint_config", "validate_checkpoint",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "BenchResult",
    "BenchmarkReport",
    "CheckpointError",
    "ComplianceReport",
    "EngineBuildError",
    "EngineBuildReport",
    "EngineShapes",
    "EngineUnavailableError",
    "ExportResult",
    "LayerCompliance",
    "Not24SparseError",
    "SemiStructuredResult",
    "SemiStructuredUnavailableError",
    "TokenDatasetSpec",
    "ToolRunner",
    "TrtllmCheckpointConfig",
    "bench_command",
    "benchmark_semistructured",
    "bitwise_equal",
    "build_commands",
    "build_engines",
    "canonicalize_zeros",
    "check_24",
    "compare",
    "compliance_report",
    "compress_24",
    "decompress_24",
    "docker_prefix",
    "export_trtllm_checkpoint",
    "parse_report_json",
    "parse_report_text",
    "parse_sparsity_log",
    "read_checkpoint_config",
    "require_semistructured_support",
    "run_benchmarks",
    "select_semistructured_layers",
    "validate_checkpoint",
    "write_token_dataset",
]
