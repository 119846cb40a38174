"""Sweep runner settings (``sweep:`` / ``--runner`` / the deployment's ``runner``): validation,
the task runners they select, and how a point is pinned to its threads and GPUs."""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.runners import Resources, pinned_environment, sweep_settings, task_runner
from wanda.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("value, field, message", [
    ("spark://h:1", "sweep.runner", "'spark://h:1' is not a runner (allowed: local, dask://HOST:PORT, ray://HOST:PORT)"),
    ("dask://h", "sweep.runner", "'dask://h' is not a runner"),
    ("dask://h:70000", "sweep.runner", "port out of range"),
])
def test_bad_runner_names_the_field_and_the_allowed_forms(value, field, message):
    with pytest.raises(ConfigError) as caught:
        sweep_settings(None, value)
    assert caught.value.field == field and message in str(caught.value)


def test_bad_resources_and_unknown_keys_name_the_field():
    with pytest.raises(ConfigError, match=r"^sweep\.resources\.gpus: .*greater than or equal to 0"):
        sweep_settings({"resources": {"gpus": -1}})
    with pytest.raises(ConfigError, match=r"^sweep\.runnr: "):
        sweep_settings({"runnr": "local"})


def test_runner_selects_prefects_task_runner():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner
    from prefect_ray import RayTaskRunner

    settings = sweep_settings({"runner": "local"}, "dask://127.0.0.1:8786")  # the CLI's --runner wins
    assert settings.kind == "dask" and settings.address == "tcp://127.0.0.1:8786"
    dask_runner = task_runner(settings, 4)
    assert isinstance(dask_runner, DaskTaskRunner) and dask_runner.address == "tcp://127.0.0.1:8786"
    ray = sweep_settings(None, "ray://head.example:10001")
    assert isinstance(task_runner(ray, 4), RayTaskRunner) and ray.address == "ray://head.example:10001"
    local = task_runner(sweep_settings(None), 3)
    assert isinstance(local, ThreadPoolTaskRunner) and local._max_workers == 3


def test_point_environment_pins_threads_and_gpus(monkeypatch):
    cpu = pinned_environment(Resources(threads=3), 1)
    assert cpu == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": ""}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert pinned_environment(Resources(gpus=1, threads=1), 1)["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match="point needs 1 GPU"):
        pinned_environment(Resources(gpus=1), 1)


def test_deployment_runner_parameter_is_validated(tmp_path):
    from flows.deployments import check_parameters, read_specs

    text = (REPO / "deploy" / "prefect.yaml").read_text().replace("runner: local", "runner: dask://nohost")
    (tmp_path / "prefect.yaml").write_text(text)
    spec = read_specs(tmp_path / "prefect.yaml", ["calibration-robustness-weekly"])[0]
    with pytest.raises(ConfigError, match=r"parameters\.runner.*not a runner"):
        check_parameters(spec)
