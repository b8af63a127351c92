"""train.report_to on torch: one short run logs to TensorBoard, MLflow and W&B (offline), and each
tracker's own reader gives back exactly the steps and values of metrics.jsonl; the loss curve; a
tracker that is asked for but not installed is one line before any framework loads.

The readers here (no framework imports) are shared with tests/mindspore/test_tracking_mindspore.py.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from helpers import RECIPES, dualtune_cli

ALL = "train.report_to=[tensorboard,mlflow,wandb]"


def overrides(tiny_bert: str, fin_data: str) -> list[str]:
    return [
        f"model.name_or_path={tiny_bert}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "train.max_steps=4",
        "train.eval_every=2",
    ]


def clean_env() -> dict:
    """The defaults under test: no tracker settings from the caller's environment."""
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        env.pop(key, None)
    return env


def expected(run_dir: Path) -> tuple[dict, dict]:
    """metrics.jsonl as {key: {step: value}}: train (step lines) and eval (every evaluation)."""
    train: dict[str, dict[int, float]] = {}
    evals: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        into = evals if rec.get("split") == "eval" else train
        for k, v in rec.items():
            if (
                k not in ("step", "epoch", "split")
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
            ):
                into.setdefault(k, {})[rec["step"]] = float(v)
    return train, evals


def assert_same(got: dict[int, float], want: dict[int, float], what: str, rel: float = 0.0) -> None:
    assert sorted(got) == sorted(want), f"{what}: steps {sorted(got)} != metrics.jsonl's {sorted(want)}"
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rel, abs=1e-12), f"{what} at step {step}"


def read_tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def read_wandb(run_dir: Path) -> tuple[dict[int, dict], dict, dict]:
    """The offline run's .wandb file (a LevelDB-style log of wandb's own protobuf records; wandb 0.31
    ships no Python reader): history by step, the final summary, the config."""
    from wandb.proto import wandb_internal_pb2 as pb

    history: dict[int, dict] = {}
    summary: dict = {}
    config: dict = {}
    # a resumed run continues its W&B run in a second offline folder (same id): read them in order
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        _read_wandb_file(path.read_bytes(), pb, history, summary, config)
    return history, summary, config


def _read_wandb_file(data: bytes, pb, history: dict, summary: dict, config: dict) -> None:
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):  # FULL or LAST: a whole record
            continue
        record = pb.Record()
        record.ParseFromString(buf)
        buf = b""
        which = record.WhichOneof("record_type")
        if which == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            history.setdefault(record.history.step.num, {}).update(row)
        elif which == "summary":
            summary.update(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.summary.update
                }
            )
        elif which == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif which == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})


def mlflow_run(run_dir: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == run_dir.name]
    return client, run


def check_all_trackers(run_dir: Path, backend: str, wandb_from: int = 1) -> None:
    """Every tracker's own reader gives metrics.jsonl's steps and values, and the rest is there.
    ``wandb_from``: W&B's steps from there on only (after kill -9, what W&B's own service had not
    written yet is lost with the process: its offline log is written in blocks)."""
    train, evals = expected(run_dir)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert sorted(train["loss"]) == [1, 2, 3, 4] and sorted(evals["eval_loss"]) == [2, 4]
    keys = [("train", k, v) for k, v in train.items()] + [("eval", k, v) for k, v in evals.items()]

    acc = read_tensorboard(run_dir)  # float32 on disk
    for prefix, key, want in keys:
        assert_same(
            {e.step: e.value for e in acc.Scalars(f"{prefix}/{key}")},
            want,
            f"tensorboard {prefix}/{key}",
            rel=1e-6,
        )
    assert acc.Scalars("final/accuracy")[0].value == pytest.approx(final["accuracy"], rel=1e-6)
    assert {"confusion_matrix", "loss_curve"} <= set(acc.Tags()["images"])
    assert {"recipe/text_summary", "run/text_summary"} <= set(acc.Tags()["tensors"])

    client, run = mlflow_run(run_dir, "minilm_demo")
    for prefix, key, want in keys:
        history = client.get_metric_history(run.info.run_id, f"{prefix}/{key}")
        assert_same({m.step: m.value for m in history}, want, f"mlflow {prefix}/{key}")
    assert run.data.metrics["final/accuracy"] == final["accuracy"]
    assert run.data.params["peft.method"] == "lora" and run.data.params["train.max_steps"] == "4"
    assert run.data.params["run.backend"] == backend and run.data.tags["dualtune.backend"] == backend
    assert run.data.tags["dualtune.device"] == "cpu" and run.data.tags["version.transformers"]
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "confusion_matrix.png",
        "loss_curve.png",
        "recipe.yaml",
        "final_metrics.json",
        "adapter",
    } <= artifacts
    assert {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "adapter")} == {
        p.name for p in (run_dir / "adapter").iterdir()
    }

    history, summary, config = read_wandb(run_dir)
    for prefix, key, want in keys:
        got = {step: row[f"{prefix}/{key}"] for step, row in history.items() if f"{prefix}/{key}" in row}
        got = {step: v for step, v in got.items() if step >= wandb_from}
        assert_same(got, {s: v for s, v in want.items() if s >= wandb_from}, f"wandb {prefix}/{key}")
    assert summary["final/accuracy"] == pytest.approx(final["accuracy"], rel=1e-12)
    assert {"confusion_matrix", "loss_curve"} <= {k.split("/")[0] for k in history[4]}  # nested: image fields
    assert config["peft"]["method"] == "lora" and config["run"]["backend"] == backend
    assert config["run"]["versions"]["dualtune"]


@pytest.fixture(scope="module")
def tracked(tiny_bert, fin_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracking") / "tracked"
    dualtune_cli(
        "run",
        str(RECIPES / "minilm_demo.yaml"),
        "--backend",
        "torch",
        "--output-dir",
        str(out),
        "--no-progress",
        *overrides(tiny_bert, fin_data),
        ALL,
        env=clean_env(),
    )
    return out


def test_trackers_read_back_metrics_jsonl(tracked):
    check_all_trackers(tracked, "torch")
    assert (tracked / "tensorboard").is_dir() and (tracked / "wandb").is_dir()
    assert (tracked.parent / "mlflow.db").is_file()


def test_failed_run_and_tracking_uri(tracked, monkeypatch):
    """A run that fails is FAILED in MLflow; MLFLOW_TRACKING_URI is where MLflow goes; closing twice is fine."""
    from dualtune.callbacks import LoopState
    from dualtune.recipe import load_recipe
    from dualtune.tracking import Tracking

    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", f"sqlite:///{tracked.parent / 'mlflow.db'}"
    )  # already made: fast
    recipe = load_recipe(RECIPES / "minilm_demo.yaml", ["train.report_to=[tensorboard,mlflow]"])
    target = tracked.parent / "failed"
    partial = tracked.parent / "failed.partial-1"
    partial.mkdir()
    (partial / "recipe.yaml").write_text(recipe.to_yaml())
    tracking = Tracking(recipe, partial, target, "torch", "cpu")
    tracking.on_train_begin(LoopState(total_steps=10, steps_per_epoch=5))
    tracking.on_step_end(
        LoopState(total_steps=10, steps_per_epoch=5, step=1),
        {"step": 1, "epoch": 0, "loss": 0.5, "lr": 0.1, "grad_norm": 2.0, "tokens": 7},
    )
    tracking.close(failed=True)
    tracking.close(failed=True)
    _, run = mlflow_run(target, "minilm_demo")
    assert run.info.status == "FAILED" and run.data.metrics == {
        "train/loss": 0.5,
        "train/lr": 0.1,
        "train/grad_norm": 2.0,
        "train/tokens": 7.0,
    }
    assert [(e.step, e.value) for e in read_tensorboard(partial).Scalars("train/loss")] == [(1, 0.5)]


def test_loss_curve_and_report_plot(tracked, tmp_path, capsys):
    from dualtune import cli
    from dualtune.report import curves

    png = (tracked / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    train, evals = expected(tracked)
    c = curves(tracked)
    assert dict(zip(c["train_steps"], c["train_loss"])) == train["loss"]
    assert dict(zip(c["eval_steps"], c["eval_loss"])) == evals["eval_loss"]
    assert c["metric"] == "accuracy" and dict(zip(c["eval_steps"], c["metric_values"])) == evals["accuracy"]
    out = tmp_path / "both.png"
    assert cli.main(["report", "--plot", str(out), str(tracked), str(tracked)]) == 0  # loads no framework
    assert "tracked" in capsys.readouterr().out and out.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["report", "--plot", str(out), str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_missing_tracker_is_one_line_before_a_backend_loads(monkeypatch, capsys, tmp_path):
    from dualtune import backend, cli, tracking

    monkeypatch.setattr(backend, "get_backend", lambda *a, **k: pytest.fail("a backend was loaded"))

    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    status = cli.main(
        [
            "run",
            str(RECIPES / "minilm_demo.yaml"),
            "--backend",
            "torch",
            "--output-dir",
            str(tmp_path / "run"),
            "train.report_to=[tensorboard,wandb]",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "train.report_to wandb" in err[0] and "pip install 'dualtune[tracking]'" in err[0]
    assert not (tmp_path / "run").exists()


def test_report_to_values():
    from dualtune.errors import RecipeError
    from dualtune.recipe import load_recipe

    recipe = RECIPES / "minilm_demo.yaml"
    assert load_recipe(recipe).train.report_to == []
    assert load_recipe(recipe, ["train.report_to=mlflow"]).train.report_to == ["mlflow"]
    with pytest.raises(RecipeError, match="train.report_to"):
        load_recipe(recipe, ["train.report_to=[comet]"])


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


def test_a_tracker_server_that_is_down_is_one_line_before_a_backend_loads(monkeypatch, capsys, tmp_path):
    import time

    from dualtune import backend, cli

    monkeypatch.setattr(backend, "get_backend", lambda *a, **k: pytest.fail("a backend was loaded"))
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.perf_counter()
    for command in ("validate", "run"):
        status = cli.main(
            [
                command,
                str(RECIPES / "minilm_demo.yaml"),
                "--output-dir",
                str(tmp_path / "run"),
                "train.report_to=mlflow",
            ]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1, err
        assert err[0].startswith(
            f"dualtune: error: train.report_to mlflow: MLFLOW_TRACKING_URI {uri} cannot be reached"
        )
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "run").exists()


@pytest.fixture
def silent_server():
    """A port that takes connections and never answers (a hung tracker server)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.mark.parametrize("strict", [False, True])
def test_a_tracker_that_hangs_mid_run_is_dropped_with_a_warning_or_stops_a_strict_run(
    silent_server, monkeypatch, tmp_path, caplog, strict
):
    """The probe passes (the port opens); MLflow's requests then time out once each (no retries):
    the run goes on with the other trackers and one warning, or stops (train.report_to_strict)."""
    import time

    from dualtune.callbacks import LoopState
    from dualtune.errors import TrackerError
    from dualtune.recipe import load_recipe
    from dualtune.tracking import Tracking, probe_trackers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", silent_server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    recipe = load_recipe(
        RECIPES / "minilm_demo.yaml",
        ["train.report_to=[tensorboard,mlflow]", f"train.report_to_strict={str(strict).lower()}"],
    )
    probe_trackers(recipe)  # reachable: the hang shows only when MLflow asks
    partial = tmp_path / "run.partial-1"
    partial.mkdir()
    tracking = Tracking(recipe, partial, tmp_path / "run", "torch", "cpu")
    started = time.perf_counter()
    if strict:
        with pytest.raises(
            TrackerError, match=r"^mlflow: start failed: .*train.report_to_strict=true stops the run"
        ):
            tracking.on_train_begin(LoopState(total_steps=10, steps_per_epoch=5))
        tracking.close(failed=True)
        return
    with caplog.at_level("WARNING", logger="dualtune"):
        tracking.on_train_begin(LoopState(total_steps=10, steps_per_epoch=5))
    assert time.perf_counter() - started < 60
    assert [t.name for t in tracking.started] == ["tensorboard"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("mlflow: start failed: ")
    assert "the run goes on without it" in warnings[0]
    tracking.on_step_end(
        LoopState(total_steps=10, steps_per_epoch=5, step=1),
        {"step": 1, "epoch": 0, "loss": 0.5, "lr": 0.1, "grad_norm": 2.0, "tokens": 7},
    )
    tracking.finish({"steps": 1, "accuracy": 0.5}, partial)
    assert [(e.step, e.value) for e in read_tensorboard(partial).Scalars("train/loss")] == [(1, 0.5)]
