"""The stage graph, declared once: ``dvc.yaml``, sweep pipelines, code digests and the flows'
ordering all come from this table, so they cannot drift apart (a test regenerates ``dvc.yaml``
and compares).

Per stage: the parameter sections it reads (DVC ``params``), the stages whose artifacts it
reads (DVC ``deps`` on their folders), and the code that decides its outputs (DVC ``deps`` on
files, and the code digest in its manifest). The code is the static import closure of the
stage's entry module inside the project (:mod:`tasks.imports`), never a hand-made list: a
module a stage imports, even inside a function, is a dependency, and one it does not import is
not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable

@dataclass(frozen=True)
class StageSpec:
    name: str
    sections: tuple[str, ...]  # parameter sections (DVC params)
    inputs: tuple[str, ...]  # upstream stages whose artifact folders it reads
    module: str = ""  # python -m target; default tasks.<name>
    args: tuple[str, ...] = ()
    # Files inside the stage folder that DVC shows as metrics / plots. A stage with any of them
    # declares its outputs file by file (DVC forbids an output inside another output).
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # the other output files, when declared file by file
    description: str = ""
    # Files the stage's outputs depend on that no import reaches (read at run time); none yet.
    extra_code: tuple[str, ...] = ()

    @property
    def entry(self) -> str:
        return self.module or f"tasks.{self.name}"

    @property
    def code_files(self) -> tuple[str, ...]:
        """Its entry module's file, then every project file that module imports (sorted)."""
        from .imports import closure

        return tuple(dict.fromkeys((*closure(self.entry), *self.extra_code)))

    @property
    def per_file_outputs(self) -> bool:
        return bool(self.metrics or self.plots)

    def command(self, params_file: str | None = None, point: str | None = None) -> str:
        parts = ["python", "-m", self.entry, *self.args]
        if params_file:
            parts += ["--params", params_file]
        if point:
            parts += ["--point", point]
        return " ".join(parts)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("materialize", ("model",), (),
              description="base model from any source to a fingerprinted safetensors folder"),
    StageSpec("calibration", ("calibration",), ("materialize",),
              description="seeded calibration token windows, their digest and a quality report"),
    StageSpec("statistics", ("statistics", "runtime"), ("materialize", "calibration"),
              description="one-pass activation statistics of the dense model (sequential mode: deferred to masks)"),
    StageSpec("masks", ("masks", "runtime"), ("materialize", "calibration", "statistics"),
              description="pruning masks (sequential mode: statistics and masks together, block by block)"),
    StageSpec("prune", ("prune", "runtime"), ("materialize", "masks"),
              description="the pruned model: base weights with the masks applied"),
    StageSpec("dense_eval", ("evaluate", "runtime"), ("materialize",),
              module="tasks.evaluate", args=("--dense",),
              metrics=("metrics.json",), files=("result.json", "manifest.json"),
              description="dense baseline evaluation, once per base model and evaluation setting"),
    StageSpec("evaluate", ("evaluate", "runtime"), ("prune", "dense_eval"),
              metrics=("metrics.json",), plots=("comparison.png",),
              files=("result.json", "comparison.md", "manifest.json"),
              description="pruned model evaluation and its comparison with the dense baseline"),
    StageSpec("export_24", ("export_24",), ("prune",),
              description="TensorRT-LLM checkpoint with 2:4 compressed weights (skipped unless 2:4)"),
    StageSpec("engine", ("engine",), ("export_24",),
              description="TensorRT-LLM engines, sparse and dense (skipped without a GPU and trtllm-build)"),
    StageSpec("benchmark", ("benchmark",), ("prune", "export_24", "engine"),
              description="trtllm-bench latency of the sparse vs dense engines (skipped without engines)"),
    StageSpec("savings", ("savings", "runtime"), ("materialize", "prune", "evaluate"),
              metrics=("metrics.json",), files=("savings.md", "manifest.json"),
              description="parameters, bytes, peak memory and prefill/decode tokens/s of the pruned model "
                          "against the dense base, measured in the same run"),
)

# Stages a sweep point may re-run on its own; everything before the first of them that a point
# changes is shared with the main pipeline.
SWEEPABLE = ("calibration", "statistics", "masks", "prune", "evaluate")
SWEEP_REPORT = StageSpec("report", (), (), module="tasks.sweep_report", description="sweep comparison table and plots")


@lru_cache(maxsize=None)
def by_name() -> dict[str, StageSpec]:
    return {spec.name: spec for spec in STAGES}


def stage(name: str) -> StageSpec:
    try:
        return by_name()[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r} (stages: {', '.join(by_name())})") from None


def order() -> list[str]:
    return [spec.name for spec in STAGES]


def ancestors(name: str) -> set[str]:
    found: set[str] = set()
    stack = list(stage(name).inputs)
    while stack:
        current = stack.pop()
        if current not in found:
            found.add(current)
            stack.extend(stage(current).inputs)
    return found


def descendants(name: str) -> set[str]:
    return {other for other in order() if name in ancestors(other)}


# ----------------------------------------------------------------------------- dvc.yaml


@dataclass
class DvcStage:
    name: str
    cmd: str
    deps: list[str]
    params: list  # section names, or {file: [keys]}
    outs: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    wdir: str | None = None
    desc: str = ""

    def as_dict(self) -> dict:
        body: dict = {}
        if self.desc:
            body["desc"] = self.desc
        if self.wdir:
            body["wdir"] = self.wdir
        body["cmd"] = self.cmd
        body["deps"] = self.deps
        if self.params:
            body["params"] = self.params
        if self.outs:
            body["outs"] = self.outs
        if self.metrics:
            body["metrics"] = self.metrics
        if self.plots:
            body["plots"] = self.plots
        return body


def dvc_stage(spec: StageSpec, folders: dict[str, str], params: list, cmd: str,
              name: str | None = None, wdir: str | None = None) -> DvcStage:
    """One DVC stage: code and input folders as deps, its folder (or its files) as outs."""
    own = folders[spec.name]
    deps = list(spec.code_files) + [folders[upstream] for upstream in spec.inputs]
    if spec.per_file_outputs:
        outs = [f"{own}/{name}" for name in spec.files]
        metrics = [f"{own}/{name}" for name in spec.metrics]
        plots = [f"{own}/{name}" for name in spec.plots]
    else:
        outs, metrics, plots = [own], [], []
    return DvcStage(name or spec.name, cmd, deps, params, outs, metrics, plots, wdir, spec.description)


def main_pipeline() -> dict:
    """The body of the project's ``dvc.yaml``; folders come from ``params.yaml`` by templating."""
    folders = {spec.name: "${paths.%s}" % spec.name for spec in STAGES}
    stages = {spec.name: dvc_stage(spec, folders, list(spec.sections), spec.command()).as_dict() for spec in STAGES}
    return {"stages": stages}


DVC_YAML_HEADER = """\
# The pipeline's stage graph. Generated from tasks/graph.py (`python -m flows.cli dvc-yaml`);
# edit the table there, not this file: a test checks that they agree.
# Stage folders come from the `paths` section of params.yaml (DVC templating).
"""


def dump_yaml(data: dict, header: str = "") -> str:
    import io

    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.default_flow_style = False
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    buffer = io.StringIO()
    yaml.dump(data, buffer)
    return header + buffer.getvalue()


def main_dvc_yaml() -> str:
    return dump_yaml(main_pipeline(), DVC_YAML_HEADER)


def code_files(names: Iterable[str]) -> list[str]:
    return sorted({path for name in names for path in stage(name).code_files})


def dvc_yaml_differences(text: str) -> list[str]:
    """How a ``dvc.yaml`` text disagrees with the generated one, stage by stage: code deps that
    are not the import closure, other changed fields, missing or extra stages."""
    from ruamel.yaml import YAML

    try:
        found = (YAML(typ="safe").load(text) or {}).get("stages") or {}
    except Exception as exc:  # a broken file is one difference
        return [f"dvc.yaml does not parse: {exc}"]
    wanted = main_pipeline()["stages"]
    lines = [f"stage {name}: missing" for name in wanted if name not in found]
    lines += [f"stage {name}: not in tasks/graph.py" for name in found if name not in wanted]
    for name in (n for n in wanted if n in found):
        want, have = wanted[name], found[name] or {}
        lacking = [d for d in want["deps"] if d not in (have.get("deps") or [])]
        extra = [d for d in (have.get("deps") or []) if d not in want["deps"]]
        if lacking:
            lines.append(f"stage {name}: deps lack {', '.join(lacking)} (imported by {by_name()[name].entry}"
                         f" or its imports)" if all(not d.startswith("$") for d in lacking)
                         else f"stage {name}: deps lack {', '.join(lacking)}")
        if extra:
            lines.append(f"stage {name}: deps name {', '.join(extra)}, which {by_name()[name].entry} does not import")
        for key in sorted(set(want) | set(have)):
            if key != "deps" and want.get(key) != have.get(key):
                lines.append(f"stage {name}: {key} differs")
    return lines
