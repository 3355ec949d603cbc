"""The replay's pieces without a server: the split, the positions, and every figure."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from evaluation.positions import (
    Position,
    ReplayError,
    choose_positions,
    source_files,
    split_files,
)
from evaluation.replay import Replay, ReplayOptions
from evaluation.scoring import Scored, reach, stored_scores
from evaluation.statistics import compare, kept_length, paired_lift, pooled, summary
from feedback.database import open_engine, upgrade
from feedback.metrics import judge
from feedback.replays import (
    StoredReplayError,
    UnknownReplayError,
    format_table,
    method_rows,
    stored_names,
    stored_report,
)
from ghostloop.settings import Settings, load_settings
from lsp_server.positions import offset_at
from tests.training_data import write_repo


def test_files_split_by_path_into_two_disjoint_halves_the_same_way_each_time(tmp_path):
    root = write_repo(tmp_path, 9)
    files = source_files(root)
    assert len(files) == 9, "virtual environments and empty files are not the repository's code"
    train, held = split_files(files, root, seed=3)
    assert sorted(train + held) == files and not set(train) & set(held)
    assert len(train) == 4 and len(held) == 5
    assert (train, held) == split_files(list(reversed(files)), root, seed=3)
    assert (train, held) != split_files(files, root, seed=4)


def test_a_repository_needs_two_files_and_must_exist(tmp_path):
    with pytest.raises(ReplayError, match="at least two"):
        split_files(source_files(write_repo(tmp_path, 1)), tmp_path, seed=0)
    with pytest.raises(ReplayError, match="neither a directory nor a file"):
        source_files(tmp_path / "missing")


def test_positions_are_real_code_once_per_line_and_seeded(tmp_path):
    root = write_repo(tmp_path, 4)
    files = source_files(root)
    positions = choose_positions(files, root, 20, seed=1)
    assert len(positions) == 20
    assert len({(p.path, p.line) for p in positions}) == 20, "a line is typed once"
    for position in positions:
        line = (root / position.path).read_text().split("\n")[position.line]
        assert line[position.character :] == position.truth and position.truth.strip()
        assert not line.lstrip().startswith(('"""', "#")), "docstrings and comments skipped"
    assert {p.kind for p in positions} == {"line_start", "mid_line"}
    assert positions == choose_positions(files, root, 20, seed=1)


def test_lsp_characters_count_utf16_units():
    """The developer finds its cursor with the server's own position helper."""
    text = "a\n𝒳 = 'é'\n"
    assert offset_at(text, 1, 0) == 2
    assert offset_at(text, 1, 2) == 3  # the script X is two UTF-16 units, one Python character
    assert offset_at(text, 1, 99) == len("a\n𝒳 = 'é'")


def scored(saved: float, suggested: int, exact: bool = False) -> Scored:
    return Scored(saved, exact, suggested, suggested == 0, 100.0, True, None)


def test_each_figure_of_a_pass():
    scores = [scored(10, 10, exact=True), scored(0, 20), scored(4, 8), scored(0, 0)]
    figures = summary(scores)
    assert figures["completions"] == 4
    assert figures["chars_saved_per_completion"] == pytest.approx(14 / 4)
    assert figures["exact_line_acceptance"] == pytest.approx(1 / 4)
    assert figures["survival_weighted_acceptance"] == pytest.approx(14 / 38, abs=1e-4)
    assert figures["mean_suggestion_chars"] == pytest.approx(38 / 4)
    assert figures["empty_rate"] == pytest.approx(1 / 4)
    low, high = figures["intervals"]["chars_saved_per_completion"][1:]
    assert low <= 14 / 4 <= high and low < high


def test_a_shorter_suggestion_raises_the_ratio_but_the_headline_falls():
    """A model that learns to stop early: retained/suggested up, characters saved down."""
    truths = [f"result = compute(alpha_{i}, beta)" for i in range(30)]
    full = [judge(t, t) for t in truths[:20]] + [judge("x = 1", t) for t in truths[20:]]
    short = [judge(t[: len(t) * 2 // 3], t) for t in truths[:20]]
    short += [judge("", t) for t in truths[20:]]

    def as_scores(outcomes: list) -> list[Scored]:
        return [
            Scored(o.retained, o.exact, o.suggested, o.reaction == "empty", 1.0, True, None)
            for o in outcomes
        ]

    lift = paired_lift(as_scores(full), as_scores(short))
    assert lift["survival_weighted_acceptance"][0] > 0
    assert lift["chars_saved_per_completion"][0] < 0
    assert lift["chars_saved_per_completion"][2] < 0, "the fall is outside the noise"
    assert lift["chars_saved_relative"][0] < 0


def test_the_lift_is_paired_by_position():
    """The same small gain at every position is certain even when positions vary widely."""
    before = [scored(float(i % 7) * 5, 40) for i in range(60)]
    after = [scored(s.chars_saved + 1, 40) for s in before]
    lift = paired_lift(before, after)
    assert lift["chars_saved_per_completion"] == [1.0, 1.0, 1.0]
    unpaired_before, unpaired_after = summary(before), summary(after)
    ranges = (
        unpaired_before["intervals"]["chars_saved_per_completion"],
        unpaired_after["intervals"]["chars_saved_per_completion"],
    )
    assert ranges[0][2] > ranges[1][1], "unpaired, the two intervals would overlap"
    with pytest.raises(ValueError, match="same positions"):
        paired_lift(before, after[:-1])


def test_compare_splits_line_starts_from_mid_line():
    positions = [
        Position(f"f.py:{i}:0", "f.py", i, 0, "line_start" if i % 2 else "mid_line", "x")
        for i in range(10)
    ]
    before = [scored(0, 5) for _ in positions]
    after = [scored(5 if p.kind == "line_start" else 0, 5) for p in positions]
    report = compare(positions, before, after)
    assert report["by_kind"]["line_start"]["after"]["chars_saved_per_completion"] == 5
    assert report["by_kind"]["mid_line"]["paired_lift"]["chars_saved_per_completion"][0] == 0
    assert report["paired_lift"]["chars_saved_per_completion"][0] == pytest.approx(2.5)
    assert compare(positions, before, None)["after"] is None


def test_kept_length_counts_only_suggestions_kept_both_times():
    """Wrong suggestions getting shorter cost nothing and leave it alone; kept ones cut
    short (a model that learns to stop early) show as a fall outside the noise."""
    wrong_before = [scored(0, 40) for _ in range(30)]
    wrong_after = [scored(0, 10) for _ in range(30)]  # shorter wrong lines: no change here
    kept_before = [scored(20, 20 + i % 5) for i in range(30)]
    cut_after = [scored(12, 12 + i % 5) for i in range(30)]
    same = kept_length(wrong_before + kept_before, wrong_after + kept_before)
    assert same is not None
    assert same["positions"] == 30 and same["relative"] == [0.0, 0.0, 0.0]
    assert (
        summary(wrong_after + kept_before)["mean_suggestion_chars"]
        < summary(wrong_before + kept_before)["mean_suggestion_chars"]
    ), "the overall mean falls all the same"
    cut = kept_length(wrong_before + kept_before, wrong_after + cut_after)
    assert cut is not None and cut["after"] < cut["before"]
    assert cut["relative"][2] < 0, "the fall is outside the noise"
    # a position kept before but rejected after is not in it, nor is one never kept
    gone = kept_length([scored(20, 20), scored(0, 30)], [scored(0, 5), scored(10, 10)])
    assert gone is None
    with pytest.raises(ValueError, match="same positions"):
        kept_length(kept_before, cut_after[:-1])


def test_the_printed_report_shows_kept_length():
    positions = [Position(f"f.py:{i}:0", "f.py", i, 0, "line_start", "x") for i in range(6)]
    before = [scored(10, 10) for _ in positions]
    after = [scored(8, 8) for _ in positions]
    report = compare(positions, before, after)
    assert report["kept_length"]["positions"] == 6
    assert compare(positions, before, None)["kept_length"] is None
    table = format_table({**report, "method": "sft", "adapter": "v1"})
    assert "kept both times (6)" in table and "-20.0 %" in table


def test_reach_counts_the_untyped_characters_the_training_half_holds_word_for_word():
    """The ceiling recall puts on a night: a held-out line the night trained on word for
    word counts in both parts, one only in the training files in the second, the rest in
    neither; characters the base model already saved are not untyped."""
    held = [
        Position("h.py:1:4", "h.py", 1, 4, "line_start", "return self._payload"),  # in kept
        Position("h.py:2:9", "h.py", 2, 9, "mid_line", "_headers = []"),  # ends a file line
        Position("h.py:3:4", "h.py", 3, 4, "line_start", "frobnicate(widget)"),  # nowhere
        Position("h.py:4:4", "h.py", 4, 4, "line_start", "return self._payload"),  # saved
    ]
    before = [scored(6, 6), scored(0, 12), scored(0, 30), scored(20, 20, exact=True)]
    trained_on = [Position("t.py:7:8", "t.py", 7, 8, "line_start", "return self._payload  ")]
    files = [
        "class Message:\n    def f(self):\n        self._headers = []\n"
        "        return self._payload\n"
    ]
    found = reach(held, before, trained_on, files)
    assert found["untyped"] == {"positions": 3, "chars": 14 + 13 + 18, "share_of_saved": 1.7308}
    assert found["in_night_data"] == {"positions": 1, "chars": 14, "share_of_saved": 0.5385}
    assert found["in_training_files"] == {"positions": 2, "chars": 27, "share_of_saved": 1.0385}
    table = format_table({**compare(held, before, None), "reach": found, "method": "sft"})
    assert "the night's data holds 14 chars at 1 positions (at most +53.8% by recall)" in table
    with pytest.raises(ValueError, match="a score per position"):
        reach(held, before[:-1], trained_on, files)


def test_the_demo_walks_fewer_training_positions_than_it_holds_out():
    from ghostloop.cli import build_parser
    from ghostloop.commands.replay import DEMO_TRAIN_POSITIONS

    parser = build_parser()
    demo = parser.parse_args(["demo"])
    assert (demo.positions, demo.train_positions) == (400, DEMO_TRAIN_POSITIONS)
    assert demo.positions > DEMO_TRAIN_POSITIONS
    replay = parser.parse_args(["replay", "somewhere"])
    assert (replay.positions, replay.train_positions) == (400, None)  # as many as held out
    assert parser.parse_args(["demo", "--train-positions", "400"]).train_positions == 400


def small_report() -> dict:
    positions = [
        Position(f"f.py:{i}:0", "f.py", i, 0, "line_start" if i % 2 else "mid_line", "x = 1")
        for i in range(8)
    ]
    before = [scored(4 if i % 2 else 0, 10) for i in range(8)]
    after = [scored(6 if i % 2 else 2, 8) for i in range(8)]
    result = {**compare(positions, before, after), "adapter": "v1"}
    return {"before": result.pop("before"), "methods": {"sft": result}, "model": "tiny"}


def test_the_terminal_and_the_dashboard_read_the_same_rows():
    """One method's block, line by line: each metric before, after and its paired lift,
    under the headline its relative lift, the length kept both times and the two kinds."""
    report = small_report()
    rows = method_rows(report["before"], report["methods"]["sft"])
    labels = [row.label for row in rows]
    assert labels == [
        "chars saved / completion",
        "relative (headline)",
        "kept both times (4)",
        "line start (4)",
        "mid line (4)",
        "exact-line acceptance",
        "retained / suggested",
        "mean suggestion chars",
        "empty suggestions",
        "latency p50 / p95 (ms)",
    ]
    headline, relative, kept, line_start, mid_line = rows[:5]
    assert headline.before.startswith("2.00 [") and headline.after.startswith("4.00 [")
    assert headline.lift.startswith("+2.000 [")
    assert relative.lift.startswith("+100.0 % [") and relative.part and not headline.part
    assert (kept.before, kept.after) == ("10.0", "8.0") and kept.lift.startswith("-20.0 % [")
    assert line_start.after.startswith("6.00 [") and mid_line.before.startswith("0.00 [")
    assert rows[-1].before == "100 / 100"
    table = format_table(report)
    for row in rows:
        assert row.label in table and row.after in table and row.lift in table
    unrun = method_rows(report["before"], {"adapter": None, "after": None})
    assert unrun[0].after == "-" and unrun[0].lift == "-"


def test_a_stored_report_is_found_by_name_and_a_bad_one_is_refused(tmp_path: Path):
    replays = tmp_path / "replays"
    for name, text in (
        ("older", json.dumps(small_report())),
        ("newer", json.dumps(small_report())),
        ("corrupt", '{"before": {"completions": 8'),
        ("foreign", json.dumps({"before": {"completions": "many", "intervals": {}}})),
        ("bad-method", json.dumps({**small_report(), "methods": {"sft": {"after": [1]}}})),
        ("bad-kind", json.dumps({**small_report(), "methods": {"sft": {"by_kind": {"x": 1}}}})),
    ):
        (replays / name).mkdir(parents=True)
        (replays / name / "report.json").write_text(text)
    (replays / "no-report").mkdir()
    ages = ("newer", "corrupt", "foreign", "bad-method", "bad-kind", "older")
    for age, name in enumerate(ages):
        os.utime(replays / name / "report.json", (1e9 - age, 1e9 - age))
    assert stored_names(tmp_path) == list(ages)
    assert stored_names(tmp_path, limit=2) == ["newer", "corrupt"]
    assert stored_names(tmp_path / "elsewhere") == []
    assert stored_report(tmp_path, "older") == small_report()
    for name in ("absent", "no-report", "..", ".", "../replays/older", ""):
        with pytest.raises(UnknownReplayError, match="'ghostloop replays' lists them"):
            stored_report(tmp_path, name)
    for name, why in (
        ("corrupt", "Expecting"),
        ("foreign", "'before' has no number 'completions'"),
        ("bad-method", "method 'sft' has unreadable 'after' figures"),
        ("bad-kind", "'int' object is not subscriptable"),
    ):
        with pytest.raises(StoredReplayError, match="run the replay again") as raised:
            stored_report(tmp_path, name)
        assert why in str(raised.value) and not isinstance(raised.value, UnknownReplayError)


def test_pooled_replays_resample_each_replay_within_itself():
    """Two splits as one sample: the point figures are the pooled means, every bootstrap
    round keeps each replay's size (a stratified bootstrap), and one replay is no pool."""
    first = [Position(f"a.py:{i}:0", "a.py", i, 0, "line_start", "x") for i in range(30)]
    second = [Position(f"b.py:{i}:4", "b.py", i, 4, "mid_line", "y") for i in range(10)]
    parts = [
        (first, [scored(2, 10) for _ in first], [scored(3, 12) for _ in first]),
        (second, [scored(10, 10) for _ in second], [scored(8, 8) for _ in second]),
    ]
    result = pooled(parts)
    assert result["before"]["completions"] == 40
    assert result["before"]["chars_saved_per_completion"] == pytest.approx((60 + 100) / 40)
    assert result["after"]["chars_saved_per_completion"] == pytest.approx((90 + 80) / 40)
    # every position's change is fixed within its replay, so with the sizes kept in each
    # round the pooled change has no spread at all; an unstratified bootstrap would have
    lift = result["paired_lift"]["chars_saved_per_completion"]
    assert lift == pytest.approx([10 / 40] * 3)
    everything = [p for part in parts for p in part[0]]
    before = [s for part in parts for s in part[1]]
    after = [s for part in parts for s in part[2]]
    loose = paired_lift(before, after)["chars_saved_per_completion"]
    assert loose[1] < lift[1] and loose[2] > lift[2]
    assert result["by_kind"]["mid_line"]["paired_lift"]["chars_saved_per_completion"][0] == -2
    plain = compare(everything, before, after)
    # the length kept both times too: 10 -> 12 in one replay, 10 -> 8 in the other
    assert result["kept_length"]["relative"] == pytest.approx([440 / 400 - 1] * 3)
    wide = plain["kept_length"]["relative"]
    assert wide[0] == pytest.approx(0.1) and wide[1] < 0.09 and wide[2] > 0.11
    for name in ("chars_saved_per_completion", "exact_line_acceptance", "mean_suggestion_chars"):
        assert result["after"][name] == plain["after"][name]  # only the intervals differ
    with pytest.raises(ValueError, match="at least two replays"):
        pooled(parts[:1])


def test_a_replay_whose_store_is_gone_cannot_be_pooled(tmp_path: Path):
    report = {
        **small_report(),
        "method": "sft",
        "positions": [
            {
                "key": "f.py:1:0",
                "path": "f.py",
                "line": 1,
                "character": 0,
                "kind": "line_start",
                "truth": "x = 1",
            }
        ],
        "served": {"before": {"f.py:1:0": "c1"}, "after": {"f.py:1:0": "c2"}},
        "store": f"sqlite:///{tmp_path / 'gone.db'}",
    }
    with pytest.raises(StoredReplayError, match=r"gone\.db is gone"):
        stored_scores("night", report)
    assert not (tmp_path / "gone.db").exists(), "looking made no empty store"
    with pytest.raises(StoredReplayError, match="has no method 'dpo': it ran sft"):
        stored_scores("night", report, "dpo")
    unpublished = {**report, "served": {"before": {"f.py:1:0": "c1"}, "after": None}}
    with pytest.raises(StoredReplayError, match="no held-out walk after sft's night"):
        stored_scores("night", unpublished)
    with pytest.raises(StoredReplayError, match="no held-out walk without repository context"):
        stored_scores("night", report, compare="context")
    with pytest.raises(StoredReplayError, match="names no readable store"):
        stored_scores("night", {**report, "store": "nonsense"})
    # a store that is there but does not hold what the report says was served
    url = f"sqlite:///{tmp_path / 'kept.db'}"
    engine = open_engine(url)
    upgrade(engine)
    engine.dispose()
    with pytest.raises(StoredReplayError, match="served completions are not in the store"):
        stored_scores("night", {**report, "store": url})
    listed = {**report, "store": url, "served": {"before": ["c1"], "after": {"f.py:1:0": "c2"}}}
    with pytest.raises(StoredReplayError, match="store cannot be read back"):
        stored_scores("night", listed)


def test_a_busy_machine_does_not_cut_the_replays_suggestions_short(tmp_path, monkeypatch):
    """The walk's suggestions are the model's alone: the servers' settings carry no deadline
    a slow moment could reach, whatever the environment says."""
    monkeypatch.setenv("GHOSTLOOP_DEADLINE_MS", "1")
    replay = Replay(Settings(), ReplayOptions(root=tmp_path, work_dir=tmp_path), io.StringIO())
    served = load_settings(environ=replay.env("replay-train"))
    assert served.serving.deadline_ms >= 600_000
    assert load_settings().serving.deadline_ms == 1  # the user's own servers keep their setting
