"""README's "Model coverage" table is what convert does: every cell recomputed for each backend usable here (the
table's columns are the registered backends, its rows fused_resnet.testing.coverage.MODELS)."""
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
    return [h.strip("`") for h in header[1:]], {r[0]: dict(zip(header[1:], r[1:])) for r in body}


def test_the_table_lists_every_backend_and_model():
    columns, rows = _readme_table()
    assert columns == list(backends.names())
    assert list(rows) == list(coverage.MODELS)


@pytest.mark.parametrize("backend", backends.names())
def test_readme_model_coverage_is_what_convert_does(backend):
    reason = backends.backend_status()[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} is not available here: {reason}")
    _, rows = _readme_table()
    for name in coverage.MODELS:
        assert rows[name][f"`{backend}`"] == coverage.cell(*coverage.coverage(name, backend)), name
