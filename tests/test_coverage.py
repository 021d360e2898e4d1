"""README's "Model coverage" table is what convert does: every cell recomputed for each backend usable here, and the
last column (what is not fused, and why) from the backends usable here (the table's columns are the registered
backends, its rows fused_resnet.testing.coverage.MODELS). The models are built on the meta device: seconds."""
import pathlib

import pytest

from fused_resnet import backends
from fused_resnet.testing import coverage

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _readme_table():
    section = README.read_text().split("\n## Model coverage\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|")]
    header, body = rows[0], rows[2:]
    return [h.strip("`") for h in header], {r[0]: dict(zip(header, r)) for r in body}


def test_the_table_lists_every_backend_and_model():
    columns, rows = _readme_table()
    assert columns == ["model", "library", *backends.names(), coverage.HEADER_TAIL]
    assert list(rows) == list(coverage.MODELS)
    assert {name: row["library"] for name, row in rows.items()} == {n: lib for n, (lib, _) in coverage.MODELS.items()}


def test_readme_model_coverage_is_what_convert_does():
    usable = [b for b, reason in backends.backend_status().items() if reason is None]
    _, rows = _readme_table()
    for name, (library, _) in coverage.MODELS.items():
        if not coverage.library_available(library):
            continue  # timm's rows need timm (the test extra)
        details = {b: coverage.coverage_detail(name, b) for b in usable}
        for b, (fused, total, _) in details.items():
            assert rows[name][f"`{b}`"] == coverage.cell(fused, total), (name, b)
        if len(usable) == len(backends.names()):
            assert rows[name][coverage.HEADER_TAIL] == coverage.why_cell({b: d[2] for b, d in details.items()}), name
    if len(usable) < len(backends.names()):
        pytest.skip(f"the why column needs every backend; usable here: {usable}")
