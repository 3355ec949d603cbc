from ghostloop.corpus import sample_positions, stdlib_dir


def test_positions_skip_comments_and_docstrings_and_are_reproducible():
    path = stdlib_dir() / "textwrap.py"
    lines = path.read_text().split("\n")
    samples = sample_positions(path, 40, seed=3)
    assert samples == sample_positions(path, 40, seed=3)
    assert {s.kind for s in samples} == {"line_start", "mid_line"}
    for sample in samples:
        line = lines[sample.line]
        assert not line.lstrip().startswith(("#", '"""', "'''"))
        assert line[len(line) - len(line.lstrip()) :].strip()
        assert sample.true_line_rest == line[len(line) - len(sample.true_line_rest) :]
