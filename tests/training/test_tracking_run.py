"""A resumed stage's MLflow run: the checkpoint's run continues; only a run the server says is gone starts a
new one (with a warning and the old id as a tag); a server that fails to answer fails the stage."""

from __future__ import annotations

import logging
import time

import mlflow
import pytest
from mlflow.exceptions import RestException
from mlflow.tracking import MlflowClient

from sharegpt4v import tracking
from sharegpt4v.errors import PlatformError
from sharegpt4v.services import free_port
from sharegpt4v.training.tracking_hooks import _tracking_run


def _checkpoint_run(client: MlflowClient) -> str:
    experiment = tracking.ensure_experiment(tracking.DEFAULT_EXPERIMENT)
    run_id = client.create_run(experiment, run_name="pretrain").info.run_id
    client.set_terminated(run_id, "KILLED")  # the killed process that wrote the checkpoint
    return run_id


def _runs(client: MlflowClient) -> set[str]:
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT).experiment_id
    return {r.info.run_id for r in client.search_runs([experiment], run_view_type=3)}  # ALL: deleted too


@pytest.fixture
def no_sleep(monkeypatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    yield slept
    mlflow.set_tracking_uri("")  # no test after this one inherits the URI mlflow was given


def test_an_unreachable_tracking_server_fails_the_stage(monkeypatch, no_sleep) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(PlatformError, match=r"pretrain: resuming the checkpoint's MLflow run 0123abcd: cannot reach "
                                            r"the MLflow server at http://127.0.0.1:\d+: Connection refused"):
        with _tracking_run(0, "pretrain", {"lr": 1}, {"stage": "pretrain"}, "0123abcd"):
            pytest.fail("the stage must not run without its MLflow run")
    assert len(no_sleep) == 2  # three attempts


def test_a_failing_server_is_asked_again_and_never_splits_the_run(mlflow_sqlite: str, monkeypatch, no_sleep) -> None:
    client = MlflowClient(mlflow_sqlite)
    run_id = _checkpoint_run(client)
    real, calls = mlflow.get_run, []

    def flaky(failures: int):
        def get_run(rid: str):
            calls.append(rid)
            if len(calls) <= failures:
                raise RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "503 from the proxy"})
            return real(rid)
        return get_run

    monkeypatch.setattr(mlflow, "get_run", flaky(1))
    with _tracking_run(0, "pretrain", {}, {}, run_id) as run:
        assert run.info.run_id == run_id  # resumed after one failed look-up
    assert len(calls) == 2 and _runs(client) == {run_id}

    calls.clear()
    monkeypatch.setattr(mlflow, "get_run", flaky(100))
    with pytest.raises(PlatformError, match=f"resuming the checkpoint's MLflow run {run_id}: MLflow at .* failed: "
                                            "TEMPORARILY_UNAVAILABLE: 503 from the proxy"):
        with _tracking_run(0, "pretrain", {}, {}, run_id):
            pytest.fail("the stage must not run")
    assert len(calls) == 3 and _runs(client) == {run_id}  # no second run


@pytest.mark.parametrize("gone", ["deleted", "unknown"])
def test_a_run_the_server_does_not_have_starts_a_new_one_loudly(mlflow_sqlite: str, caplog, gone: str) -> None:
    client = MlflowClient(mlflow_sqlite)
    run_id = _checkpoint_run(client)
    if gone == "deleted":
        client.delete_run(run_id)
    else:
        run_id = "f" * 32  # the checkpoint was written against another tracking server
    with caplog.at_level(logging.WARNING, logger="sharegpt4v.training"):
        with _tracking_run(0, "pretrain", {"lr": 1}, {"stage": "pretrain"}, run_id) as run:
            assert run.info.run_id != run_id
    new = client.get_run(run.info.run_id)
    assert new.data.tags["resumed_from_run"] == run_id and new.data.tags["stage"] == "pretrain"
    assert new.data.params == {"lr": "1"}
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert run_id in warning and ("was deleted" if gone == "deleted" else "does not exist") in warning
