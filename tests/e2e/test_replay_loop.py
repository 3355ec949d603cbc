"""``ghostloop replay`` end to end on the tiny model: the bookkeeping of the loop's proof.

A small repository, the real server over LSP, a real nightly run, the hot-swap, and the
report checked against the store: every figure recomputed here from the rows by hand.
"""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from feedback.admin_web.app import create_app
from feedback.database import open_engine
from feedback.replays import format_table, method_rows
from feedback.schema import Completion, FeedbackEvent, TrainingRun
from feedback.store import events_by_completion
from tests.training_data import TRAIN_ENV, write_repo
from trainer.labels import label

WINDOWS = "0.3,0.6,0.9"


def replay(tmp_path: Path, model: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GHOSTLOOP_MODEL": str(model), **TRAIN_ENV}
    command = [sys.executable, "-m", "ghostloop", "replay", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def by_hand(session: Session, ids: list[str | None], truths: list[str]) -> dict[str, float]:
    """chars saved and exact-line acceptance straight from the rows, without the report's code."""
    saved, exact, suggested = 0.0, 0, 0
    for completion_id, truth in zip(ids, truths, strict=True):
        if completion_id is None:
            continue
        row = session.get(Completion, completion_id)
        assert row is not None
        suggested += len(row.suggestion)
        if row.outcome == "accepted":
            last = session.scalars(
                select(FeedbackEvent).where(
                    FeedbackEvent.completion_id == completion_id,
                    FeedbackEvent.kind == "survival",
                    FeedbackEvent.window_s == 0.9,
                )
            ).one()
            saved += round(row.accepted_length * last.survival_ratio)
            exact += row.suggestion.rstrip() == truth.rstrip()
        else:
            assert row.outcome == "rejected", row.outcome
    n = len(ids)
    return {
        "chars_saved_per_completion": saved / n,
        "exact_line_acceptance": exact / n,
        "mean_suggestion_chars": suggested / n,
    }


@dataclass(frozen=True)
class FirstNight:
    """One replay of two nights (sft and dpo) that every test below reads."""

    root: Path
    data_dir: Path
    work: Path
    report: dict[str, Any]

    @property
    def keys(self) -> list[str]:
        return [p["key"] for p in self.report["positions"]]

    @property
    def truths(self) -> list[str]:
        return [p["truth"] for p in self.report["positions"]]

    @property
    def served_before(self) -> dict[str, str | None]:
        return self.report["served"]["before"]

    @property
    def served_after(self) -> dict[str, dict[str, str | None]]:
        methods = self.report["methods"]
        return {name: methods[name]["served"] for name in methods}


@pytest.fixture(scope="module")
def first_night(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> FirstNight:
    tmp_path = tmp_path_factory.mktemp("replay")
    root = write_repo(tmp_path / "repo", 12)
    work = tmp_path / "data" / "replays" / "first-night"  # where the dashboard looks
    done = replay(
        tmp_path,
        tiny_model_dir,
        *(str(root), "--positions", "40", "--ungated", "--json", "--no-progress"),
        *("--methods", "sft,dpo"),
        *("--work-dir", str(work), "--windows", WINDOWS, "--seed", "5"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return FirstNight(root, tmp_path / "data", work, json.loads(done.stdout))


@pytest.fixture
def store(first_night: FirstNight) -> Iterator[Session]:
    engine = open_engine(f"sqlite:///{first_night.work / 'ghostloop.db'}")
    with Session(engine) as session:
        yield session
    engine.dispose()


def test_the_halves_split_by_file_and_every_pass_walks_the_same_positions(first_night):
    report, root = first_night.report, first_night.root
    split = report["split"]
    files = sorted(p.name for p in root.glob("module_*.py"))
    assert sorted(split["train_files"] + split["held_out_files"]) == files
    assert not set(split["train_files"]) & set(split["held_out_files"])
    assert split["held_out_positions"] == split["train_positions"] == 40
    held_out = set(split["held_out_files"])
    positions = report["positions"]
    assert len(positions) == 40 and {p["path"] for p in positions} <= held_out

    keys = first_night.keys
    methods = report["methods"]
    assert list(methods) == ["sft", "dpo"] and report["method"] == "sft"
    assert report["served"]["after"] == first_night.served_after["sft"]
    assert list(first_night.served_before) == keys, "paired by position"
    assert all(list(s) == keys for s in first_night.served_after.values()), "paired by position"
    assert report["before"]["completions"] == 40
    assert all(methods[name]["after"]["completions"] == 40 for name in methods)
    assert report["adapter"] == methods["sft"]["adapter"] and report["gated"] is False


def test_each_night_trains_on_the_training_half_alone_and_its_pass_serves_its_adapter(
    first_night, store
):
    report, methods = first_night.report, first_night.report["methods"]
    by_user: dict[str, list[Completion]] = {}
    for row in store.scalars(select(Completion)).all():
        by_user.setdefault(row.user, []).append(row)
    # the training half's baseline, then the held-out half three times: nothing else
    assert sorted(by_user) == ["replay-heldout", "replay-train"]
    before_ids = {i for i in first_night.served_before.values() if i}
    after_ids = {
        name: {i for i in served.values() if i} for name, served in first_night.served_after.items()
    }
    assert {r.id for r in by_user["replay-heldout"]} == before_ids.union(*after_ids.values())
    assert all(store.get(Completion, i).adapter_version is None for i in before_ids)
    for name, ids in after_ids.items():
        versions = {store.get(Completion, i).adapter_version for i in ids}
        assert versions == {methods[name]["adapter"]}, f"{name}'s pass served its adapter"

    # every method trained on the training half alone, all of it, from the base model
    runs = store.scalars(select(TrainingRun).order_by(TrainingRun.id)).all()
    assert [run.method for run in runs] == ["sft", "dpo"]
    for run in runs:
        assert run.data_counts["completions"] == len(by_user["replay-train"])
        assert set(run.data_counts["users"]) == {"replay-train"}
        assert run.evaluation["baseline"] == "base model"
        assert run.decision == "published"  # --ungated: published whatever the gate said
        if not run.evaluation["passed"]:
            assert run.reason.startswith("published without the gate's approval")
        assert methods[run.method]["gate_passed"] == run.evaluation["passed"]
    assert report["methods"]["sft"]["adapter"] != report["methods"]["dpo"]["adapter"]


def test_every_figure_of_the_report_is_the_one_the_rows_give_by_hand(first_night, store):
    report, methods = first_night.report, first_night.report["methods"]
    keys, truths = first_night.keys, first_night.truths
    served_before, served_after = first_night.served_before, first_night.served_after
    figures = {"before": (report["before"], served_before)}
    figures.update({name: (methods[name]["after"], served_after[name]) for name in methods})
    for name, (reported, ids) in figures.items():
        expected = by_hand(store, [ids[k] for k in keys], truths)
        for metric, value in expected.items():
            assert abs(reported[metric] - value) < 1e-3, (name, metric)
    lift = report["paired_lift"]["chars_saved_per_completion"]
    difference = (
        report["after"]["chars_saved_per_completion"]
        - report["before"]["chars_saved_per_completion"]
    )
    assert abs(lift[0] - difference) < 1e-3 and lift[1] <= lift[0] <= lift[2]
    assert set(report["by_kind"]) == {"line_start", "mid_line"}


def test_the_kept_length_counts_the_positions_both_passes_saved_typing_at(first_night, store):
    methods = first_night.report["methods"]
    keys, truths, before = first_night.keys, first_night.truths, first_night.served_before
    for name in methods:
        ids = first_night.served_after[name]
        pairs = [
            (by_hand(store, [before[k]], [t]), by_hand(store, [ids[k]], [t]))
            for k, t in zip(keys, truths, strict=True)
        ]
        both = [
            (old["mean_suggestion_chars"], new["mean_suggestion_chars"])
            for old, new in pairs
            if old["chars_saved_per_completion"] > 0 and new["chars_saved_per_completion"] > 0
        ]
        kept = methods[name]["kept_length"]
        if not both:
            assert kept is None, name
            continue
        assert kept["positions"] == len(both), name
        assert abs(kept["before"] - sum(b for b, _ in both) / len(both)) < 0.01
        assert abs(kept["after"] - sum(a for _, a in both) / len(both)) < 0.01
    assert first_night.report["kept_length"] == methods["sft"]["kept_length"]


def test_the_reach_is_what_the_base_model_left_untyped(first_night, store):
    keys, truths, before = first_night.keys, first_night.truths, first_night.served_before
    untyped = [
        len(t.rstrip()) - by_hand(store, [before[k]], [t])["chars_saved_per_completion"]
        for k, t in zip(keys, truths, strict=True)
    ]
    reach = first_night.report["reach"]
    assert reach["untyped"]["positions"] == sum(gap > 0 for gap in untyped)
    assert abs(reach["untyped"]["chars"] - sum(g for g in untyped if g > 0)) < 0.2
    # a kept rest of line is the end of a line of the training files: a subset
    assert (
        reach["in_night_data"]["chars"]
        <= reach["in_training_files"]["chars"]
        <= reach["untyped"]["chars"]
    )


def test_a_night_learns_the_line_the_developer_finished_and_it_shows(first_night, store):
    """What a night learns from an accept: the line the developer finished there, not the
    suggestion's region (cut off where a suggestion stopped short)."""
    keys, truths = first_night.keys, first_night.truths
    before_ids = sorted(i for i in first_night.served_before.values() if i)
    accepted_before = [
        (row, truth)
        for key, truth in zip(keys, truths, strict=True)
        if (row := store.get(Completion, first_night.served_before[key] or "")) is not None
        and row.outcome == "accepted"
    ]
    events = events_by_completion(session=store, completion_ids=before_ids)
    for row, truth in accepted_before:
        example = label(row, events[row.id])
        assert example is not None and example.kept == truth, (row.suggestion, truth)
    methods = first_night.report["methods"]
    reactions = first_night.report["reactions"][f"{methods['sft']['adapter']}, held-out half"]
    after = [i for i in first_night.served_after["sft"].values() if i]
    accepted = sum(store.get(Completion, i).outcome == "accepted" for i in after)
    assert reactions.get("accepted", 0) + reactions.get("edited", 0) == accepted
    assert accepted > 0, "a night on the training half taught the tiny model its habits"


def test_the_report_is_written_with_its_chart(first_night):
    stored = json.loads((first_night.work / "report.json").read_text())
    assert stored == first_night.report
    assert (first_night.work / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_dashboard_shows_the_replay_beside_the_live_figures(first_night):
    report = first_night.report
    dashboard = TestClient(create_app(open_engine(report["store"]), "t" * 32, first_night.data_dir))
    dashboard.headers["Authorization"] = "Bearer " + "t" * 32
    overview = dashboard.get("/")
    assert overview.status_code == 200
    row = overview.text[overview.text.index("first-night") :]
    for method in ("sft", "dpo"):
        after = report["methods"][method]["after"]["chars_saved_per_completion"]
        assert f"{method}: {after:.2f}" in row
    chart = dashboard.get("/replays/first-night/report.png")
    assert chart.status_code == 200 and chart.content[:4] == b"\x89PNG"
    assert dashboard.get("/replays/..%2F..%2Fetc/report.png").status_code == 404
    # ... and the whole report on its own page, each method's table as the terminal prints it
    page = dashboard.get("/replays/first-night")
    assert page.status_code == 200
    assert 'href="/replays/first-night"' in overview.text
    for method in ("sft", "dpo"):
        table = page.text[page.text.index(f'data-method="{method}"') :]
        table = table[: table.index("</table>")]
        for row in method_rows(report["before"], report["methods"][method]):
            cells = (row.label, row.before, row.after, row.lift)
            assert "".join(f'<td class="num">{html.escape(c)}</td>' for c in cells[1:]) in table
    assert dashboard.get("/replays/second-night").status_code == 404


def replays_command(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GHOSTLOOP_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    command = [sys.executable, "-m", "ghostloop", "replays", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_the_terminal_lists_the_replay_and_shows_it_as_it_printed(first_night):
    report = first_night.report
    listed = replays_command(first_night.data_dir, "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["name"] == "first-night" and row["positions"] == 40
    assert {m["method"]: m["lift"] for m in row["methods"]} == {
        # none where the base model saved nothing: a lift relative to zero is no figure
        method: report["methods"][method]["paired_lift"].get("chars_saved_relative")
        for method in ("sft", "dpo")
    }
    shown = replays_command(first_night.data_dir, "show", "first-night")
    assert shown.returncode == 0, shown.stderr
    assert format_table(report) in shown.stdout
    assert report["split"]["root"] in shown.stdout


def test_pooled_replays_read_their_figures_back_from_each_store(first_night, tmp_path):
    """Pooled with another replay (here the same one under a second name, in a data dir of
    its own), the figures come out as the report has them."""
    data_dir = tmp_path / "data"
    for name in ("first-night", "second-night"):
        (data_dir / "replays" / name).mkdir(parents=True)
        report_file = data_dir / "replays" / name / "report.json"
        report_file.write_bytes((first_night.work / "report.json").read_bytes())
    pooled = replays_command(data_dir, "pool", "first-night", "second-night")
    assert pooled.returncode == 0, pooled.stderr
    assert "pooled: 2 replays, 80 held-out positions" in pooled.stdout
    report = first_night.report
    for method in ("sft", "dpo"):
        done = replays_command(
            data_dir, "pool", "first-night", "second-night", "--method", method, "--json"
        )
        assert done.returncode == 0, done.stderr
        both = json.loads(done.stdout)
        assert both["before"]["completions"] == 80 and both["methods"] == [method]
        figures = report["methods"][method]
        for name in ("chars_saved_per_completion", "exact_line_acceptance"):
            assert both["before"][name] == report["before"][name]
            assert both["after"][name] == figures["after"][name]
            assert both["paired_lift"][name][0] == figures["paired_lift"][name][0]


def test_bad_replays_commands_are_refused_by_name(first_night):
    alone = replays_command(first_night.data_dir, "pool", "first-night")
    assert alone.returncode == 2 and "two or more replays" in alone.stderr
    for bad, words in (
        (["show"], "name one replay"),
        (["show", "third-night"], "no replay named 'third-night'"),
        (["first-night"], "invalid choice: 'first-night'"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["pool", "first-night", "third-night"], "no replay named 'third-night'"),
    ):
        refused = replays_command(first_night.data_dir, *bad)
        assert refused.returncode == 2 and words in refused.stderr, (bad, refused.stderr)


def test_replay_on_onnxruntime_int8_exports_and_swaps_the_adapter(tmp_path, tiny_model_dir):
    """--backend: both servers and the night on onnxruntime, whatever the environment says;
    the night exports the adapter and its gate judges the int8 copies of the base model's
    export and of the candidate's; the held-out server swaps that export in and serves the
    int8 copy (the demo's fp32 default takes the same path without the copies).
    --train-positions: fewer positions walked in the training half than held out.
    --also-on: the same adapter walked again in fp32, and int8 against it, paired."""
    root = write_repo(tmp_path / "repo", 8)
    work = tmp_path / "replay"
    command = [sys.executable, "-m", "ghostloop", "replay", str(root), "--train-positions", "20"]
    command += ["--backend", "onnxruntime-int8", "--positions", "24", "--ungated", "--json"]
    command += ["--also-on", "onnxruntime"]
    command += ["--no-progress", "--work-dir", str(work), "--windows", WINDOWS]
    done = subprocess.run(
        command,
        env={
            **os.environ,
            **TRAIN_ENV,
            "GHOSTLOOP_MODEL": str(tiny_model_dir),
            "GHOSTLOOP_BACKEND": "torch",  # --backend wins over the environment
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["backend"] == "onnxruntime-int8"
    version = report["adapter"]
    assert version, report["methods"]["sft"]["message"]
    assert report["after"]["completions"] == 24
    assert report["split"]["train_positions"] == 20
    assert report["training_half"]["completions"] == 20
    published = work / "adapters" / version / "onnx"
    meta = json.loads((published / "adapter.onnx_adapter.json").read_text())
    assert meta["adapter"] == version, "the night wrote the file of the adapter it published"
    assert not list(published.glob("*.onnx")), "an adapter file, not a model"
    engine = open_engine(f"sqlite:///{work / 'ghostloop.db'}")
    with Session(engine) as session:
        run = session.scalars(select(TrainingRun)).one()
        assert run.evaluation["backend"] == "onnxruntime-int8"
        after = [i for i in report["served"]["after"].values() if i]
        assert after and all(session.get(Completion, i).adapter_version == version for i in after)
        also = report["methods"]["sft"]["also_on"]
        assert (also["backend"], also["after"]["completions"]) == ("onnxruntime", 24)
        again = [i for i in also["served"].values() if i]
        assert again and not set(again) & set(after)
        assert all(session.get(Completion, i).adapter_version == version for i in again)
        assert "chars_saved_per_completion" in also["paired_lift"]
    engine.dispose()
    assert "the same adapter on onnxruntime: " in format_table(report)
    assert "onnxruntime-int8 against onnxruntime, paired: " in format_table(report)


def test_replay_refuses_a_missing_path_and_changes_nothing(tmp_path, tiny_model_dir):
    work = tmp_path / "replay"
    done = replay(
        tmp_path, tiny_model_dir, str(tmp_path / "nowhere"), "--work-dir", str(work), "--json"
    )
    assert done.returncode == 2
    assert "neither a directory nor a file" in done.stderr and done.stdout == ""
    assert not work.exists()


def test_a_refused_adapter_is_not_replayed_and_the_report_says_so(tmp_path, tiny_model_dir):
    """Gated (the default): a night too short to learn anything publishes nothing."""
    root = write_repo(tmp_path / "repo", 12)
    work = tmp_path / "replay"
    env = {**os.environ, "GHOSTLOOP_MODEL": str(tiny_model_dir), **TRAIN_ENV}
    env.update({"GHOSTLOOP_EPOCHS": "1", "GHOSTLOOP_LEARNING_RATE": "1e-6"})
    command = [sys.executable, "-m", "ghostloop", "replay", str(root), "--positions", "40"]
    command += ["--json", "--no-progress", "--work-dir", str(work), "--windows", WINDOWS]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["gated"] is True and report["adapter"] is None
    assert report["after"] is None and report["paired_lift"] is None
    assert report["methods"]["sft"]["gate_passed"] is False
    assert "no adapter was published" in done.stderr
    assert list(report["reactions"]) == ["baseline, training half", "baseline, held-out half"]
    engine = open_engine(f"sqlite:///{work / 'ghostloop.db'}")
    with Session(engine) as session:
        run = session.scalars(select(TrainingRun)).one()
        assert run.decision == "refused"
        held_out = session.scalars(
            select(Completion).where(Completion.user == "replay-heldout")
        ).all()
        assert len(held_out) == report["before"]["served"], "the held-out half ran once"
    engine.dispose()


def test_replay_refuses_bad_windows_a_dead_store_and_a_missing_model(tmp_path, tiny_model_dir):
    root = write_repo(tmp_path / "repo", 4)
    work = tmp_path / "replay"
    done = replay(tmp_path, tiny_model_dir, str(root), "--work-dir", str(work), "--windows", "2,1")
    assert done.returncode == 2 and "--windows takes increasing positive seconds" in done.stderr
    assert not work.exists()
    done = replay(tmp_path, tiny_model_dir, str(root), "--work-dir", str(work), "--backend", "trt")
    assert done.returncode == 2 and "--backend takes one of torch, onnxruntime" in done.stderr
    assert not work.exists()
    done = replay(tmp_path, tiny_model_dir, str(root), "--work-dir", str(work), "--also-on", "gpu")
    assert done.returncode == 2 and "--also-on takes one of torch, onnxruntime" in done.stderr
    assert not work.exists()
    done = replay(
        tmp_path, tiny_model_dir, str(root), "--work-dir", str(work), "--train-positions", "0"
    )
    assert done.returncode == 2 and "--train-positions must be at least 1" in done.stderr
    assert not work.exists()

    dead = "postgresql+psycopg://postgres@127.0.0.1:1/test"
    done = replay(
        tmp_path, tiny_model_dir, str(root), "--work-dir", str(work), "--database-url", dead
    )
    assert done.returncode == 2 and f"cannot use the store {dead}" in done.stderr
    assert not (work / "report.json").exists()

    done = replay(tmp_path, tmp_path / "no-such-model", str(root), "--work-dir", str(work))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "ghostloop replay: server could not load its model" in done.stderr
    assert "Traceback" not in done.stderr and not (work / "report.json").exists()


def test_replay_with_repository_context_walks_each_pass_with_and_without_it(
    tmp_path, tiny_model_dir
):
    """GHOSTLOOP_REPO_CONTEXT_TOKENS: the training half's developer has the training
    files alone for a workspace, the held-out one the repository on disk; a second
    held-out server without context walks the same positions before and after the night.
    No held-out prompt ever holds a snippet of its own file (where the true rest of the
    line is), and pooled comparisons read each pair of walks back from the store."""
    root = write_repo(tmp_path / "repo", 12)
    data_dir = tmp_path / "data"
    work = data_dir / "replays" / "with-context"
    command = [sys.executable, "-m", "ghostloop", "replay", str(root), "--positions", "32"]
    command += ["--ungated", "--json", "--no-progress", "--work-dir", str(work)]
    command += ["--windows", WINDOWS, "--seed", "3"]
    env = {**os.environ, **TRAIN_ENV, "GHOSTLOOP_MODEL": str(tiny_model_dir)}
    env["GHOSTLOOP_REPO_CONTEXT_TOKENS"] = "96"
    env["GHOSTLOOP_MIN_EVAL_EXAMPLES"] = "2"  # the random model leaves many lines blank
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    context = report["context"]
    keys = [p["key"] for p in report["positions"]]
    assert context["tokens"] == 96
    assert context["before_without"]["completions"] == 32
    assert context["after_without"]["completions"] == 32
    assert list(context["served"]["before_without"]) == keys, "paired by position"
    bare_after = report["methods"]["sft"]["context"]["served"]
    assert list(bare_after) == keys
    for name in ("paired_lift_context", "paired_lift_night_context", "paired_lift_product"):
        assert "chars_saved_per_completion" in context[name], name
    hits = context["snippet_hits"]
    assert 0 <= hits["positions"] <= 32 and hits["with"]["completions"] == hits["positions"]
    assert hits["long_lines"]["positions"] <= hits["positions"]
    assert hits["long_lines"]["with"]["completions"] == hits["long_lines"]["positions"]

    held_out = set(report["split"]["held_out_files"])
    by_position = {p["key"]: p for p in report["positions"]}
    engine = open_engine(f"sqlite:///{work / 'ghostloop.db'}")
    with Session(engine) as session:
        with_context = [report["served"]["before"], report["served"]["after"]]
        without = [context["served"]["before_without"], bare_after]
        shown = 0
        for served in with_context:
            for key, cid in served.items():
                row = session.get(Completion, cid) if cid else None
                if row is None:
                    continue
                shown += bool(row.prompt_repository)
                own = by_position[key]["path"]
                assert f"Path: {own}\n" not in row.prompt_repository, (
                    "its own file is never searched"
                )
        assert shown >= 48, "the held-out prompts carry the repository"
        for served in without:
            ids = [cid for cid in served.values() if cid]
            assert ids and all(session.get(Completion, i).prompt_repository == "" for i in ids)
            assert all(session.get(Completion, i).user == "replay-heldout" for i in ids)
        training = session.scalars(
            select(Completion).where(Completion.user == "replay-train")
        ).all()
        assert any(row.prompt_repository for row in training)
        for row in training:
            assert not any(f"Path: {path}\n" in row.prompt_repository for path in held_out), (
                "the training half's workspace holds the training files alone"
            )
    engine.dispose()
    assert "repository context (96 tokens)" in format_table(report)

    (data_dir / "replays" / "again").mkdir(parents=True)
    (data_dir / "replays" / "again" / "report.json").write_bytes(
        (work / "report.json").read_bytes()
    )
    for compare, key in (("context", "paired_lift_context"), ("product", "paired_lift_product")):
        pooled = replays_command(
            data_dir, "pool", "with-context", "again", "--compare", compare, "--json"
        )
        assert pooled.returncode == 0, pooled.stderr
        both = json.loads(pooled.stdout)
        assert both["compare"] == compare and both["before"]["completions"] == 64
        name = "chars_saved_per_completion"
        assert both["paired_lift"][name][0] == context[key][name][0]
    refused = replays_command(data_dir, "pool", "with-context", "again", "--compare", "nightly")
    assert refused.returncode == 2 and "--compare 'nightly' is not one of" in refused.stderr
