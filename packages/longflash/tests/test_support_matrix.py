"""docs/support-matrix.md is generated from the backends' check(): the committed page must
match what the code decides today, and the generator must show what check() answers."""

from __future__ import annotations

import os

from _scripts import load_script

gen = load_script("docs/gen_support_matrix.py", "gen_support_matrix")


def test_committed_page_is_up_to_date():
    assert gen.PAGE.read_text() == gen.render(), (
        "docs/support-matrix.md is stale: run python docs/gen_support_matrix.py"
    )


class NoSoftcap:
    name = "fake"
    frameworks = frozenset({"torch"})

    def check(self, call):
        return ["softcap not supported"] if call.softcap is not None else []


def test_cells_are_what_check_answers():
    col = gen.Column("fake", "torch", "fake-pkg", NoSoftcap())
    notes = gen.Notes()
    assert gen._cell(col, gen._call(), notes) == "✓"
    assert gen._cell(col, gen._call(softcap=30.0), notes) == "✗ (1)"
    assert notes.items == {"fake: softcap not supported": 1}
    missing = gen.Column("gone", "torch", "gone-pkg", None, "not importable: boom")
    assert gen._cell(missing, gen._call(), notes) == "n/a (2)"


def test_every_backend_is_loaded_from_the_sources():
    cols = gen.load_columns()
    assert {c.backend for c in cols} == set(gen.ORDER)
    assert all(c.obj is not None for c in cols), [c.why_missing for c in cols]
    assert [c.framework for c in cols if c.backend == "reference"] == ["torch", "jax"]


def test_render_leaves_the_interpreter_switches_as_they_were(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("LONGFLASH_PALLAS_INTERPRET", raising=False)
    gen.render()
    assert os.environ["TRITON_INTERPRET"] == "0"
    assert "LONGFLASH_PALLAS_INTERPRET" not in os.environ
