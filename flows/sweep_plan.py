"""A sweep as a generated DVC pipeline: ``sweeps/<name>/dvc.yaml`` and ``sweeps/<name>/params.yaml``.

Each point re-runs only the stages its overrides touch and everything after them, up to
``evaluate``; the stages before are the main pipeline's own artifacts. A sparsity, pattern or
method sweep in one-pass mode therefore shares the base model, the calibration tokens, the
statistics and the dense evaluation: one calibration pass serves every point. A calibration-size
sweep gets its own calibration and statistics per point.

The generated files are ordinary DVC files: ``dvc repro sweeps/<name>/dvc.yaml`` reproduces the
sweep, ``dvc dag`` shows it, its ``dvc.lock`` is its lineage, and DVC's run cache serves points
seen before (under the same point name).
"""
from __future__ import annotations

import itertools
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import graph
from tasks.params import PipelineParams, apply_overrides, params_dict, parse_value, validate_params
from wanda.atomic import atomic_file
from wanda.config import parse_pattern
from wanda.errors import ConfigError

SWEEP_ROOT = "sweeps"
ARTIFACT_ROOT = "artifacts/sweeps"
AXIS_SECTIONS = ("calibration", "statistics", "masks")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass
class Point:
    name: str
    overrides: dict[str, Any]
    params: PipelineParams
    stages: list[str] = field(default_factory=list)  # the stages this point runs itself


@dataclass
class SweepPlan:
    name: str
    axes: dict[str, list[Any]]
    base: PipelineParams
    points: list[Point]

    @property
    def folder(self) -> str:
        return f"{SWEEP_ROOT}/{self.name}"

    @property
    def params_file(self) -> str:
        return f"{self.folder}/params.yaml"

    @property
    def dvc_file(self) -> str:
        return f"{self.folder}/dvc.yaml"

    @property
    def artifact_folder(self) -> str:
        return f"{ARTIFACT_ROOT}/{self.name}"

    @property
    def report_folder(self) -> str:
        return f"{self.artifact_folder}/report"

    def address(self, point: Point, stage: str) -> str:
        return f"{self.dvc_file}:{point.name}-{stage}"

    @property
    def report_address(self) -> str:
        return f"{self.dvc_file}:report"

    def shared_stages(self) -> list[str]:
        """Main-pipeline stages the points read (with their ancestors), in pipeline order."""
        needed = {"dense_eval", *graph.ancestors("dense_eval")}
        for point in self.points:
            for stage in point.stages:
                for upstream in graph.stage(stage).inputs:
                    if upstream not in point.stages:
                        needed |= {upstream, *graph.ancestors(upstream)}
        return [name for name in graph.order() if name in needed]


def parse_axis(item: str) -> tuple[str, list[Any]]:
    """``masks.sparsity=0.3,0.4`` -> ("masks.sparsity", [0.3, 0.4]) (values typed as YAML)."""
    if "=" not in item:
        raise ConfigError("sweep.axis", f"{item!r} is not KEY=V1,V2,...", "e.g. masks.sparsity=0.3,0.5,0.7")
    key, _, values = item.partition("=")
    key = key.strip()
    if key.split(".")[0] not in AXIS_SECTIONS or "." not in key:
        raise ConfigError("sweep.axis", f"{key!r} cannot be swept",
                          ", ".join(f"{section}.<field>" for section in AXIS_SECTIONS))
    parsed = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
    if not parsed:
        raise ConfigError(f"sweep.{key}", "no values")
    return key, parsed


def _token(value: Any) -> str:
    text = str(value).lower()
    return re.sub(r"[^a-z0-9]+", "_", text).strip("_") or "x"


def point_name(overrides: dict[str, Any]) -> str:
    """Stable, readable names (DVC stage names and parameter keys: no dots or colons)."""
    return "__".join(f"{key.split('.')[-1]}-{_token(value)}" for key, value in overrides.items())[:120]


def expand(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the axes; an N:M pattern fixes the sparsity to N/M (deduplicated)."""
    keys = list(axes)
    seen: set[tuple] = set()
    points = []
    for values in itertools.product(*(axes[key] for key in keys)):
        overrides = dict(zip(keys, values))
        pattern = overrides.get("masks.pattern")
        if pattern is not None and isinstance(pattern, str):
            try:
                nm = parse_pattern(pattern.strip())
            except ValueError as exc:
                raise ConfigError("masks.pattern", str(exc)) from None
            if nm is not None:
                overrides["masks.sparsity"] = nm[0] / nm[1]
        key = tuple(sorted((k, str(v)) for k, v in overrides.items()))
        if key not in seen:
            seen.add(key)
            points.append(overrides)
    return points


def first_changed(base: PipelineParams, params: PipelineParams) -> str:
    for section in ("calibration", "statistics"):
        if getattr(base, section) != getattr(params, section):
            return section
    return "masks"


def plan_sweep(name: str, axes: dict[str, list[Any]], base: PipelineParams, base_data: dict[str, Any]) -> SweepPlan:
    """Validate every point before anything runs; errors name the point and the field."""
    if not _NAME.match(name):
        raise ConfigError("sweep.name", f"{name!r} is not a valid sweep name", "lowercase letters, digits, - and _")
    if not axes:
        raise ConfigError("sweep.axes", "nothing to sweep", "e.g. --sparsity 0.3,0.5,0.7 or -A masks.method=wanda,magnitude")
    points = []
    for overrides in expand(axes):
        label = point_name(overrides)
        items = [f"{key}={_yaml_scalar(value)}" for key, value in overrides.items()]
        try:
            params = validate_params(apply_overrides(base_data, items))
        except ConfigError as exc:
            raise ConfigError(f"sweep point {label}: {exc.field}", str(exc).split(": ", 1)[-1]) from None
        stages = list(graph.SWEEPABLE[graph.SWEEPABLE.index(first_changed(base, params)):])
        folders = {stage: f"{ARTIFACT_ROOT}/{name}/{label}/{stage}" for stage in stages}
        params = params.model_copy(update={"paths": params.paths.model_copy(update=folders)})
        points.append(Point(label, overrides, params, stages))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ConfigError("sweep.axes", "two points get the same name; use distinct values")
    return SweepPlan(name, axes, base, points)


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- files


def sweep_params_document(plan: SweepPlan) -> dict[str, Any]:
    return {
        "sweep": {"name": plan.name, "axes": {k: list(v) for k, v in plan.axes.items()},
                  "dense_eval": plan.base.paths.dense_eval, "report": plan.report_folder},
        "points": {
            point.name: {"overrides": dict(point.overrides), "stages": point.stages, "params": params_dict(point.params)}
            for point in plan.points
        },
    }


def sweep_pipeline(plan: SweepPlan) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for point in plan.points:
        folders = {name: getattr(point.params.paths, name) for name in graph.order()}
        for stage_name in point.stages:
            spec = graph.stage(stage_name)
            keys = [f"points.{point.name}.params.{section}" for section in spec.sections]
            dvc_stage = graph.dvc_stage(spec, folders, [{plan.params_file: keys}],
                                        spec.command(plan.params_file, point.name), name=f"{point.name}-{stage_name}",
                                        wdir="../..")
            stages[dvc_stage.name] = dvc_stage.as_dict()
    report = graph.SWEEP_REPORT
    deps = list(report.code_files) + [plan.base.paths.dense_eval]
    deps += [point.params.paths.evaluate for point in plan.points]
    deps += [point.params.paths.masks for point in plan.points]
    deps = list(dict.fromkeys(deps))  # points may share a masks folder
    stages["report"] = graph.DvcStage(
        "report", f"python -m {report.entry} --params {plan.params_file}", deps, [{plan.params_file: ["sweep"]}],
        outs=[f"{plan.report_folder}/table.md", f"{plan.report_folder}/manifest.json"],
        metrics=[f"{plan.report_folder}/results.json"],
        plots=[f"{plan.report_folder}/perplexity_vs_sparsity.png", f"{plan.report_folder}/block_sparsity.png"],
        wdir="../..", desc=report.description).as_dict()
    return {"stages": stages}


HEADER = "# Generated by `wanda-pipeline sweep` ({what}); regenerated by each sweep of this name.\n"


def write_sweep_files(root: Path, plan: SweepPlan) -> None:
    """Write both files; drop lock entries and folders of points no longer in the sweep."""
    folder = root / plan.folder
    folder.mkdir(parents=True, exist_ok=True)
    old_points = _existing_points(root / plan.params_file)
    with atomic_file(root / plan.params_file, "w") as handle:
        handle.write(graph.dump_yaml(sweep_params_document(plan), HEADER.format(what="points and their parameters")))
    pipeline = sweep_pipeline(plan)
    with atomic_file(root / plan.dvc_file, "w") as handle:
        handle.write(graph.dump_yaml(pipeline, HEADER.format(what="the stage graph of every point")))
    _prune_lock(root / plan.folder / "dvc.lock", set(pipeline["stages"]))
    for gone in old_points - {point.name for point in plan.points}:
        shutil.rmtree(root / ARTIFACT_ROOT / plan.name / gone, ignore_errors=True)


def _existing_points(path: Path) -> set[str]:
    from tasks.params import read_yaml

    if not path.is_file():
        return set()
    try:
        return set((read_yaml(path).get("points") or {}))
    except ConfigError:
        return set()


def _prune_lock(path: Path, keep: set[str]) -> None:
    if not path.is_file():
        return
    from tasks.params import _yaml

    yaml = _yaml("rt")
    data = yaml.load(path.read_text())
    stages = data.get("stages") or {}
    for name in [n for n in stages if n not in keep]:
        del stages[name]
    import io

    buffer = io.StringIO()
    yaml.dump(data, buffer)
    with atomic_file(path, "w") as handle:
        handle.write(buffer.getvalue())
