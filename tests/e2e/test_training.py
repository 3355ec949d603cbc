"""The nightly job end to end: a real LSP session's feedback in, a gated adapter out."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.database import open_engine
from feedback.schema import AdapterVersion, PreferencePair, TrainingRun
from ghostloop import registry
from ghostloop.models import load_model, resolve_model
from ghostloop.settings import Settings
from tests.e2e.conftest import StartServer
from tests.training_data import (
    OTHER_TRUTH,
    SHORT_WINDOWS,
    TRAIN_ENV,
    TRUTH,
    other_function_text,
    record_session,
    write_rows,
)

REPO = Path(__file__).parents[2]


def train(env: dict[str, str], *args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """``ghostloop train`` in its own process; ``prelude`` runs first (fault injection)."""
    code = prelude + "\nimport sys\nfrom ghostloop.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "train", *args],
        cwd=REPO,
        env={**os.environ, **TRAIN_ENV, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def model_name(model: Path) -> str:
    return resolve_model(Settings.of(model=str(model)))[0]


def publish_first(url: str, env: dict[str, str], model: Path) -> None:
    """Two hours ago users kept ``return result``; tonight's first run publishes for it.
    Rows written later come after its cut-off: the next night's feedback."""
    write_rows(
        url,
        model_name(model),
        30,
        lambda index: TRUTH,
        start=datetime.now(UTC) - timedelta(hours=2),
    )
    first = train(env)
    assert "published" in first.stdout and "not published" not in first.stdout, first.stdout


Row = TypeVar("Row", TrainingRun, AdapterVersion)


def all_rows(url: str, table: type[Row]) -> list[Row]:
    engine = open_engine(url)
    with Session(engine) as session:
        rows = list(session.scalars(select(table).order_by(table.id)))
        session.expunge_all()
    engine.dispose()
    return rows


def runs(url: str) -> list[TrainingRun]:
    return all_rows(url, TrainingRun)


def adapter_rows(url: str) -> list[AdapterVersion]:
    return all_rows(url, AdapterVersion)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, isolated_data_dir: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    return request.getfixturevalue("empty_postgres_url")  # counts start from zero


async def test_a_real_session_trains_gates_and_publishes_an_adapter(
    start_server: StartServer, database_url: str, isolated_data_dir: Path, tiny_model_dir: Path
):
    env = {"GHOSTLOOP_DATABASE_URL": database_url, "GHOSTLOOP_SURVIVAL_WINDOWS_S": SHORT_WINDOWS}
    client = await start_server(env=env)
    ids = await record_session(client, positions=30)
    await client.shutdown_session()

    done = train({**env, "GHOSTLOOP_MODEL": str(tiny_model_dir)}, "--method", "sft")
    assert done.returncode == 0, done.stderr
    assert "published" in done.stdout and "not published" not in done.stdout, done.stdout
    assert "gate: candidate" in done.stderr  # the progress bars and loss lines go to stderr
    assert len(done.stdout.splitlines()) == 1  # stdout is the one-line result
    run = runs(database_url)[-1]
    assert (run.status, run.decision, run.method) == ("finished", "published", "sft")
    assert run.data_counts["completions"] == 30 and run.data_counts["labelled"] == 30
    assert (run.data_counts["train"], run.data_counts["eval"]) == (24, 6)
    assert run.losses["train_loss_after"] < run.losses["train_loss_before"]
    gate = run.evaluation
    assert (
        gate["after"]["chars_saved_per_completion"] > gate["before"]["chars_saved_per_completion"]
    )
    assert gate["paired_lift"]["chars_saved_per_completion"][1] > 0  # interval above zero
    assert gate["after"]["exact_line_acceptance"] > 0
    [adapter] = adapter_rows(database_url)
    assert (adapter.status, adapter.run_id) == ("active", run.id)
    assert registry.verify(Path(adapter.path), adapter.checksum)["r"] == 16
    assert adapter.evidence["gate"]["passed"] is True
    engine = open_engine(database_url)
    with Session(engine) as session:
        pairs = list(session.scalars(select(PreferencePair).where(PreferencePair.run_id == run.id)))
        assert {p.completion_id for p in pairs} == set(ids)
        assert {p.chosen.rstrip("\n") for p in pairs} == {TRUTH}
        assert all(p.ranking and p.ranking["events"] for p in pairs)
        assert sum(p.split == "eval" for p in pairs) == 6
    engine.dispose()

    # what an admin sees of it
    [listed] = [json.loads(line) for line in ghostloop(env, "runs", "--json").stdout.splitlines()]
    assert (listed["id"], listed["decision"], listed["data_counts"]["train"]) == (
        run.id,
        "published",
        24,
    )
    shown = ghostloop(env, "pairs", "--run", str(run.id), "--json", "--limit", "100")
    assert {json.loads(line)["completion_id"] for line in shown.stdout.splitlines()} == set(ids)
    [published] = ghostloop(env, "adapters", "list", "--json").stdout.splitlines()
    assert json.loads(published)["run"] == run.id and json.loads(published)["status"] == "active"

    again = train({**env, "GHOSTLOOP_MODEL": str(tiny_model_dir)})
    assert again.returncode == 0 and again.stdout.startswith("nothing to train"), again.stdout


def test_the_gate_refuses_an_adapter_that_generates_worse(
    isolated_data_dir: Path, tiny_model_dir: Path
):
    url = f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    env = {"GHOSTLOOP_DATABASE_URL": url, "GHOSTLOOP_MODEL": str(tiny_model_dir)}
    publish_first(url, env, tiny_model_dir)
    # the next night: older feedback teaches a short, useless line; what users keep most
    # recently (the held-out part) is still the real line
    write_rows(
        url,
        model_name(tiny_model_dir),
        30,
        lambda index: "r" if index < 24 else TRUTH,
    )
    second = train(env)
    assert second.returncode == 0 and "not published" in second.stdout, second.stdout
    run = runs(url)[-1]
    assert run.decision == "refused" and "does not exclude zero" in (run.reason or "")
    assert run.evaluation["baseline"] == adapter_rows(url)[0].version  # judged against it
    assert [a.status for a in adapter_rows(url)] == ["active"]


def test_too_little_data_and_no_data_exit_zero_with_the_counts(
    isolated_data_dir: Path, tiny_model_dir: Path
):
    url = f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    env = {"GHOSTLOOP_DATABASE_URL": url, "GHOSTLOOP_MODEL": str(tiny_model_dir)}
    nothing = train(env)
    assert nothing.returncode == 0 and nothing.stdout.startswith("nothing to train")
    write_rows(url, model_name(tiny_model_dir), 5, lambda index: TRUTH)
    little = train(env)
    assert little.returncode == 0, little.stderr
    assert little.stdout.startswith("too little to train: 5 completions, 5 labelled")
    assert runs(url)[-1].status == "skipped"


DIE = "lambda *args, **kwargs: os.kill(os.getpid(), 9)"
KILL_AT = {
    # after training, before the gate decides
    "training": f"import trainer.gate as g\ng.run_gate = {DIE}",
    # the adapter's files are written, not yet renamed into the registry
    "publish-files": f"import ghostloop.registry as r\nr.os.rename = {DIE}",
    # renamed into the registry, its row not yet written
    "publish-row": f"import feedback.adapter_rows as a\na.publish = {DIE}",
}


@pytest.mark.parametrize("where", list(KILL_AT))
def test_a_killed_run_leaves_the_registry_and_the_active_adapter_as_they_were(
    isolated_data_dir: Path, tiny_model_dir: Path, where: str
):
    url = f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    env = {"GHOSTLOOP_DATABASE_URL": url, "GHOSTLOOP_MODEL": str(tiny_model_dir)}
    publish_first(url, env, tiny_model_dir)
    [before] = adapter_rows(url)
    listing = sorted(p.name for p in (isolated_data_dir / "adapters").iterdir())
    # a new habit the active adapter does not know yet: the next adapter would win
    write_rows(
        url,
        model_name(tiny_model_dir),
        30,
        lambda index: OTHER_TRUTH,
        prefix=other_function_text,
    )

    killed = train(env, prelude="import os\n" + KILL_AT[where])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [after] = adapter_rows(url)
    assert (after.version, after.status, after.checksum) == (
        before.version,
        "active",
        before.checksum,
    )
    registry.verify(Path(after.path), after.checksum)
    survivors = {p.name for p in (isolated_data_dir / "adapters").iterdir()}
    visible = sorted(n for n in survivors if not n.startswith(registry.PARTIAL_PREFIX))
    if where != "publish-row":
        assert visible == listing
    else:  # renamed but never recorded: the server reads only rows, the next run removes it
        assert len(visible) == len(listing) + 1

    retried = train(env)  # the data was never consumed: the next run trains on it
    assert "published" in retried.stdout, retried.stdout
    assert sorted(p.name for p in (isolated_data_dir / "adapters").iterdir()) == sorted(
        a.version for a in adapter_rows(url)
    )


def test_ctrl_c_marks_the_run_interrupted_and_publishes_nothing(
    isolated_data_dir: Path, tiny_model_dir: Path
):
    url = f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    env = {"GHOSTLOOP_DATABASE_URL": url, "GHOSTLOOP_MODEL": str(tiny_model_dir)}
    write_rows(url, model_name(tiny_model_dir), 30, lambda index: TRUTH)
    prelude = (
        "import trainer.gate as g\n"
        "def interrupt(*args, **kwargs):\n    raise KeyboardInterrupt\n"
        "g.run_gate = interrupt"
    )
    stopped = train(env, prelude=prelude)
    assert stopped.returncode == 130 and "nothing was published" in stopped.stderr
    assert runs(url)[-1].status == "interrupted" and adapter_rows(url) == []


def test_a_second_concurrent_run_exits_with_a_clear_message(
    isolated_data_dir: Path, tiny_model_dir: Path
):
    isolated_data_dir.mkdir(parents=True, exist_ok=True)
    with (isolated_data_dir / "train.lock").open("a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        blocked = train({"GHOSTLOOP_MODEL": str(tiny_model_dir)})
    assert blocked.returncode == 0
    assert "another ghostloop train is running" in blocked.stdout
    assert not (isolated_data_dir / "ghostloop.db").exists()  # it did not even open the store


def test_two_training_processes_under_accelerate_publish_like_one(
    isolated_data_dir: Path, tiny_model_dir: Path
):
    """What several GPUs do, here with two CPU processes (gloo)."""
    url = f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    env = {
        "GHOSTLOOP_DATABASE_URL": url,
        "GHOSTLOOP_MODEL": str(tiny_model_dir),
        "GHOSTLOOP_TRAIN_PROCESSES": "2",
        "GHOSTLOOP_EPOCHS": "12",  # each step sees twice the examples: as many steps as one
    }
    write_rows(url, model_name(tiny_model_dir), 30, lambda index: TRUTH)
    done = train(env)
    # a worker that dies says why near the start of the output, the launcher at the end
    why = [line for line in done.stderr.splitlines() if "rror" in line or "terminate" in line]
    assert done.returncode == 0 and "published" in done.stdout, "\n".join(why[:20])
    run = runs(url)[-1]
    assert run.losses["processes"] == 2 and run.parameters["train_processes"] == 2
    assert run.losses["train_loss_after"] < run.losses["train_loss_before"]
    [adapter] = adapter_rows(url)
    registry.verify(Path(adapter.path), adapter.checksum)


def ghostloop(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ghostloop", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_operators_list_roll_back_and_promote_adapters(
    isolated_data_dir: Path, tiny_model_dir: Path
):
    url = f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    env = {"GHOSTLOOP_DATABASE_URL": url, "GHOSTLOOP_MODEL": str(tiny_model_dir)}
    assert "no adapters published yet" in ghostloop(env, "adapters", "list").stdout
    nothing = ghostloop(env, "adapters", "rollback")
    assert nothing.returncode == 1 and "no active adapter to roll back" in nothing.stderr
    publish_first(url, env, tiny_model_dir)
    write_rows(
        url, model_name(tiny_model_dir), 30, lambda index: OTHER_TRUTH, prefix=other_function_text
    )
    assert "published" in train(env).stdout
    first, second = (a.version for a in adapter_rows(url))
    listing = ghostloop(env, "adapters", "list").stdout
    assert first in listing and second in listing and "lift +" in listing

    back = ghostloop(env, "adapters", "rollback")
    assert back.returncode == 0 and f"{second} rolled back; {first} serves" in back.stdout
    assert [a.status for a in adapter_rows(url)] == ["active", "rolled_back"]
    again = ghostloop(env, "adapters", "promote", second)
    assert again.returncode == 0 and [a.status for a in adapter_rows(url)] == ["retired", "active"]
    unknown = ghostloop(env, "adapters", "promote", "no-such-version")
    assert unknown.returncode == 1 and f"known versions: {first}, {second}" in unknown.stderr
    assert [a.status for a in adapter_rows(url)] == ["retired", "active"]  # nothing changed


def test_a_dead_database_or_a_missing_model_is_one_clear_line(
    isolated_data_dir: Path, tiny_model_dir: Path
):
    dead = train(
        {
            "GHOSTLOOP_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            "GHOSTLOOP_MODEL": str(tiny_model_dir),
        }
    )
    assert dead.returncode == 1 and "cannot reach the database" in dead.stderr
    missing = train({"GHOSTLOOP_MODEL": str(isolated_data_dir / "no-such-model")})
    assert missing.returncode == 1 and "model path not found" in missing.stderr


@pytest.mark.parametrize("method", ["dpo", "rrhf"])
def test_the_whole_job_runs_with_each_preference_method(
    isolated_data_dir: Path, tiny_model_dir: Path, method: str
):
    url = f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    env = {"GHOSTLOOP_DATABASE_URL": url, "GHOSTLOOP_MODEL": str(tiny_model_dir)}
    write_rows(url, model_name(tiny_model_dir), 30, lambda index: TRUTH)
    done = train(env, "--method", method)
    assert done.returncode == 0 and f"({method})" in done.stdout, done.stderr[-3000:]
    run = runs(url)[-1]
    assert (run.status, run.method) == ("finished", method)
    assert run.decision in ("published", "refused") and run.evaluation["reason"]
    assert run.losses["train_loss_after"] < run.losses["train_loss_before"]
    assert "preference_accuracy_after" in run.evaluation["likelihood"]
    if method == "rrhf":  # each training pair carries its ranked candidates
        engine = open_engine(url)
        with Session(engine) as session:
            pairs = session.scalars(
                select(PreferencePair).where(PreferencePair.split == "train")
            ).all()
            assert all(
                {c["text"] for c in p.ranking["candidates"]} == {TRUTH, "pass"} for p in pairs
            )
        engine.dispose()


def test_on_the_onnxruntime_backend_publishing_writes_the_adapter_file(
    isolated_data_dir: Path, tiny_model_dir: Path
):
    from ghostloop import onnx_backend

    url = f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    env = {
        "GHOSTLOOP_DATABASE_URL": url,
        "GHOSTLOOP_MODEL": str(tiny_model_dir),
        "GHOSTLOOP_BACKEND": "onnxruntime",
    }
    publish_first(url, env, tiny_model_dir)
    [adapter] = adapter_rows(url)
    file = Path(adapter.path) / registry.EXPORT_DIR / onnx_backend.ADAPTER_FILE
    meta = json.loads(file.with_name(file.name + ".json").read_text())
    assert (meta["adapter"], meta["adapter_checksum"]) == (adapter.version, adapter.checksum)
    assert registry.verify(Path(adapter.path), adapter.checksum)  # the file left it intact
    assert not list(Path(adapter.path).rglob("*.onnx")), "no model per adapter"
    # what the server will do with it: bind it to the base export as this very adapter
    settings = Settings.of(
        model=str(tiny_model_dir), device="cpu", backend="onnxruntime", data_dir=isolated_data_dir
    )
    base = onnx_backend.base_export(load_model(settings), settings)
    served = onnx_backend.adapter_file(
        Path(adapter.path), base, version=adapter.version, checksum=adapter.checksum
    )
    assert served.version == adapter.version and served.nbytes < base.path.stat().st_size / 10


def test_on_the_onnxruntime_backend_the_gate_judges_the_exports_that_would_be_served(
    isolated_data_dir: Path, tiny_model_dir: Path
):
    """With onnxruntime serving, the gate generates with the baseline's adapter file and the
    candidate's on the base export (made before the gate and published as judged); a night
    on torch publishes the adapter file all the same; an active adapter published without
    one (by an earlier version) is judged with torch on both sides."""
    url = f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    env = {
        "GHOSTLOOP_DATABASE_URL": url,
        "GHOSTLOOP_MODEL": str(tiny_model_dir),
        "GHOSTLOOP_GATE_ENFORCED": "false",  # each night publishes: the gate's verdict aside
    }
    publish_first(url, env, tiny_model_dir)  # under torch, its adapter file written too
    assert runs(url)[-1].evaluation["backend"] == "torch"
    first = Path(adapter_rows(url)[-1].path)
    assert (first / "onnx" / "adapter.onnx_adapter").is_file()
    shutil.rmtree(first / "onnx")  # as an earlier version published it
    onnx = {**env, "GHOSTLOOP_BACKEND": "onnxruntime"}
    name = model_name(tiny_model_dir)
    for backend in ("torch", "onnxruntime"):
        previous = adapter_rows(url)[-1]
        write_rows(url, name, 30, lambda index: TRUTH)
        done = train(onnx)
        assert done.returncode == 0 and "published" in done.stdout, done.stderr[-3000:]
        run = runs(url)[-1]
        assert run.evaluation["backend"] == backend
        assert run.evaluation["baseline"] == previous.version
        assert (backend == "torch") == ("the gate generates with torch" in done.stderr)
        adapter = adapter_rows(url)[-1]
        meta = json.loads((Path(adapter.path) / "onnx" / "adapter.onnx_adapter.json").read_text())
        assert (meta["adapter"], meta["adapter_checksum"]) == (adapter.version, adapter.checksum)
        assert registry.verify(Path(adapter.path), adapter.checksum)
        leftovers = list((isolated_data_dir / "train-work").glob("*"))
        assert leftovers == [], "the staged candidate was moved into the registry"
