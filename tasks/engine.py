"""Stage ``engine``: TensorRT-LLM engines (sparse and dense) from the exported checkpoint.

Needs an NVIDIA GPU and ``trtllm-build`` (on the PATH or through ``engine.container``). Without
them, or without an exported checkpoint, the stage is skipped and its manifest says exactly what
is missing and where the checkpoint is. The manifest also records what this machine offered
(``summary.environment``), so the flows re-run a stage skipped for lack of a GPU on a machine
that has one.
"""
from __future__ import annotations

import shutil

from .common import StageContext, StageResult, stage_entry

NAME = "engine"
ENGINES = "engines"


def gpu_environment(container: str | None = None) -> dict:
    """What this machine offers the TensorRT-LLM stages (cheap: no CUDA initialisation)."""
    import os

    from wanda.export import engine as engine_lib
    from wanda.export.engine import BUILD_TOOL, CONTAINER_ENV

    return {
        "nvidia_smi": engine_lib.nvidia_gpu_visible(),
        "build_tool": shutil.which(BUILD_TOOL) is not None,
        "container": bool(container or os.environ.get(CONTAINER_ENV)),
    }


def missing_gpu_reason(env: dict) -> str | None:
    if not env["nvidia_smi"]:
        return "no NVIDIA GPU on this machine (nvidia-smi not found)"
    if not (env["build_tool"] or env["container"]):
        from wanda.export.engine import INSTALL_HINT

        return f"trtllm-build not found: {INSTALL_HINT}"
    return None


def _body(ctx: StageContext) -> StageResult:
    export = ctx.input("export_24")
    section = ctx.params.engine
    env = gpu_environment(section.container)
    # Recorded even when skipped: the flows compare it with what a later machine offers.
    if export.skipped:
        return StageResult.skipped(f"no checkpoint to build from; export_24: {export.reason}", environment=env)
    if not section.enabled:
        return StageResult.skipped("engine.enabled is false", environment=env)
    checkpoint = export.file("checkpoint")
    missing = missing_gpu_reason(env)
    if missing:
        return StageResult.skipped(f"{missing}; the exported checkpoint is at {checkpoint}", environment=env)

    from wanda.export import EngineShapes, ToolRunner, build_engines
    from wanda.export.engine import EngineUnavailableError

    shapes = EngineShapes(**section.shapes.model_dump())
    try:
        report = build_engines(checkpoint, ctx.work / ENGINES, shapes, runner=ToolRunner(section.container),
                               timeout=section.timeout_s)
    except EngineUnavailableError as exc:
        return StageResult.skipped(str(exc), environment=env)
    engines = {name: path.relative_to(ctx.work).as_posix() for name, path in report.engine_dirs().items()}
    return StageResult(summary={"engines": engines, "shapes": shapes.model_dump(), "versions": report.versions,
                                "warnings": report.warnings, "environment": env,
                                "container": section.container})


run, main = stage_entry(NAME, _body)


if __name__ == "__main__":
    main()
