"""Joining a Ray cluster that refuses the driver gives advice, not a traceback (no cluster needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from cai.ray_executor import RayExecutor, RayUnavailable  # noqa: E402


class AuthRefused(Exception):
    pass


def refuse(message: str, cause: Exception | None = None):
    def init(**kwargs):
        error = ConnectionError(message)
        raise error from cause
    return init


def test_a_token_auth_cluster_says_to_set_ray_auth_mode(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse("Failed to connect to Ray cluster at 10.0.0.1:6379",
                                            AuthRefused("InvalidAuthToken: Authentication token is missing")))
    with pytest.raises(RayUnavailable, match="requires token authentication; set RAY_AUTH_MODE=token"):
        RayExecutor(address="auto")._connect()


def test_another_connection_failure_names_the_address(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse("Could not find any running Ray instance"))
    with pytest.raises(RayUnavailable, match="cannot join the Ray cluster at 127.0.0.1:1: Could not find") as info:
        RayExecutor(address="127.0.0.1:1")._connect()
    assert "RAY_AUTH_MODE" not in str(info.value)


def test_retry_errors_takes_the_executor_flags_of_cai_generate(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import cai.cli.jobs as jobs_cli
    from cai.cli import app

    asked = []
    monkeypatch.setattr(jobs_cli, "retry_errors", lambda job_dir, stop, executor: asked.append(executor) or 1 / 0)
    runner = CliRunner()
    result = runner.invoke(app, ["jobs", "retry-errors", str(tmp_path), "--executor", "ray", "--ray-address", "auto",
                                 "--replicas", "3", "--gpus-per-replica", "1"])
    assert isinstance(result.exception, ZeroDivisionError)
    assert asked[0].model_dump(include={"name", "address", "replicas", "gpus_per_replica"}) == {
        "name": "ray", "address": "auto", "replicas": 3, "gpus_per_replica": 1.0}
    refused = runner.invoke(app, ["jobs", "retry-errors", str(tmp_path), "--replicas", "2"])
    assert refused.exit_code == 2 and "need --executor ray" in refused.output
