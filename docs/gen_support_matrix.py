"""The support matrix page, generated from the backends' own ``check()``.

Every cell is what a backend's ``check(call)`` answers for one representative
``AttentionCall``: the same code that decides dispatch and writes the errors users see, so
the page cannot claim what the code refuses. Nothing runs a kernel, and no GPU, torch, jax or
triton is needed: the backend packages are imported from this repository's sources
(``packages/*/src``), whose backend modules import no framework.

The cuda backend reads which head dims and dtypes its library was compiled with; without a
library its declared data (``HEAD_DIMS``, ``DTYPES``) stands for a full build, which is what
the page describes.

  python docs/gen_support_matrix.py           # rewrite docs/support-matrix.md
  python docs/gen_support_matrix.py --check   # exit 1 if the committed page is stale

It is also a mkdocs hook (mkdocs.yml, ``hooks:``): the site's page is generated at build
time, so it is never stale; the test suite checks the committed copy.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "support-matrix.md"
INTERPRET_ENV = ("TRITON_INTERPRET", "LONGFLASH_PALLAS_INTERPRET")

# name -> (source folder, module, pip package). The reference backend is part of core.
PACKAGES = {
    "cuda": ("packages/longflash-cuda/src", "longflash_cuda", "longflash-cuda"),
    "triton": ("packages/longflash-triton/src", "longflash_triton", "longflash-triton"),
    "pallas": ("packages/longflash-jax/src", "longflash_jax", "longflash-jax"),
}
ORDER = ("reference", "cuda", "triton", "pallas")


@dataclass
class Column:
    backend: str
    framework: str
    package: str
    obj: Any  # the Backend, or None when its package could not be imported
    why_missing: str = ""

    @property
    def title(self) -> str:
        return f"{self.backend}<br>{self.framework}"


def _declared_cuda(module: Any) -> Any:
    """The cuda backend with its declared full build in place of a compiled library."""
    cls = module.CudaBackend
    if not hasattr(cls, "_capabilities"):
        raise RuntimeError(
            "longflash_cuda.CudaBackend no longer has _capabilities(); update "
            "docs/gen_support_matrix.py to read the declared build data another way"
        )

    class Declared(cls):
        def _capabilities(self):
            return {dt: frozenset(module.HEAD_DIMS) for dt in module.DTYPES}, True

    return Declared()


def load_columns() -> list[Column]:
    from longflash import reference

    found: dict[str, tuple[Any, str, str]] = {"reference": (reference.backend, "longflash", "")}
    for name, (src, module_name, package) in PACKAGES.items():
        path = str(ROOT / src)
        if path not in sys.path:
            sys.path.insert(0, path)
        try:
            module = importlib.import_module(module_name)
            obj = _declared_cuda(module) if name == "cuda" else module.backend
            found[name] = (obj, package, "")
        except Exception as exc:  # the page says so instead of failing the docs build
            found[name] = (None, package, f"not importable: {exc!r}")
    cols = []
    for name in ORDER:
        obj, package, why = found[name]
        # torch first, then jax, then any other framework a backend declares
        rank = {"torch": 0, "jax": 1}
        frameworks = (
            sorted(obj.frameworks, key=lambda f: (rank.get(f, 2), f)) if obj is not None else ["?"]
        )
        cols += [Column(name, fw, package, obj, why) for fw in frameworks]
    return cols


@contextlib.contextmanager
def _env(interpret: bool) -> Iterator[None]:
    """The interpreter switches off (GPU rows) or on (the CPU row that uses them)."""
    saved = {k: os.environ.get(k) for k in INTERPRET_ENV}
    try:
        for k in INTERPRET_ENV:
            if interpret:
                os.environ[k] = "1"
            else:
                os.environ.pop(k, None)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _call(**changes: Any) -> Any:
    from longflash.call import AttentionCall

    base = dict(
        framework="torch",
        device="cuda",
        dtype="bfloat16",
        B=2,
        Nq=1024,
        Nk=1024,
        Hq=16,
        Hk=16,
        Dqk=128,
        Dv=128,
        causal=False,
        scale=128**-0.5,
    )
    base.update(changes)
    if "Dqk" in changes and "scale" not in changes:
        base["scale"] = changes["Dqk"] ** -0.5
    return AttentionCall(**base)


def _varlen(**changes: Any) -> Any:
    from longflash.call import Varlen

    cu = (0, 700, 701, 1724)  # three sequences, one of length 1
    return _call(B=3, Nq=1023, Nk=1023, varlen=Varlen(cu, cu, 1724, 1724), **changes)


Row = tuple[str, Callable[[str], Any]]


def _rows() -> list[tuple[str, list[Row]]]:
    """(section, rows); each row builds the call for a framework. Base: bf16, head dim 128,
    16 heads, batch 2, 1024 tokens, no mask, on an NVIDIA GPU."""

    def r(label: str, **changes: Any) -> Row:
        return label, lambda fw: _call(framework=fw, **changes)

    causal = dict(causal=True, window=(None, 0))
    return [
        (
            "dtype",
            [r(dt, dtype=dt) for dt in ("float16", "bfloat16", "float32", "float64")],
        ),
        (
            "head dim (q·k = v)",
            [r(str(d), Dqk=d, Dv=d) for d in (32, 64, 80, 96, 128, 160, 192, 256, 512)],
        ),
        (
            "head dim q·k ≠ v",
            [
                r("192 / 128", Dqk=192, Dv=128),
                r("128 / 64", Dqk=128, Dv=64),
                r("64 / 128", Dqk=64, Dv=128),
            ],
        ),
        (
            "mask and score",
            [
                r("none"),
                r("causal", **causal),
                r("causal, Nq < Nk (1 query, 1024 keys)", Nq=1, **causal),
                r("sliding window (256, 0), causal", causal=True, window=(256, 0)),
                r("window (128, 128)", window=(128, 128)),
                r("window (None, 64): right side only", window=(None, 64)),
                r("softcap 30", softcap=30.0),
                r("softcap 30, causal", softcap=30.0, **causal),
            ],
        ),
        (
            "heads and batch",
            [
                r("GQA 16 / 4", Hk=4),
                r("MQA 16 / 1", Hk=1),
                r("batch 100 000 (16 tokens)", B=100_000, Nq=16, Nk=16),
            ],
        ),
        (
            "variable length (packed)",
            [
                ("varlen", lambda fw: _varlen(framework=fw)),
                (
                    "varlen, causal, GQA 16 / 4",
                    lambda fw: _varlen(framework=fw, Hk=4, **causal),
                ),
            ],
        ),
    ]


class Notes:
    """Numbered footnotes, one per distinct reason text, in order of appearance."""

    def __init__(self) -> None:
        self.items: dict[str, int] = {}

    def ref(self, text: str) -> int:
        return self.items.setdefault(text, len(self.items) + 1)


def _cell(col: Column, call: Any, notes: Notes) -> str:
    if col.obj is None:
        return f"n/a ({notes.ref(f'{col.backend}: {col.why_missing}')})"
    reasons = col.obj.check(call)
    if not reasons:
        return "✓"
    # "(1, 2)", not "[1] [2]", which Markdown would read as reference links
    return "✗ (" + ", ".join(str(notes.ref(f"{col.backend}: {x}")) for x in reasons) + ")"


def _table(cols: list[Column], header: str, rows: list[tuple[str, list[str]]]) -> list[str]:
    out = [
        f"| {header} | " + " | ".join(c.title for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    out += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return out


def render() -> str:
    cols = load_columns()
    notes = Notes()
    lines = [
        "# Support matrix",
        "",
        "<!-- Generated by docs/gen_support_matrix.py from each backend's check(); do not "
        "edit by hand. -->",
        "",
        "Each cell is the answer of the backend's own `check()` for one representative call: "
        "✓ accepts, ✗ declines with the numbered reasons (the text `longflash.explain` and "
        "`UnsupportedError` show). The page is generated from the code that makes the "
        "decision, by `python docs/gen_support_matrix.py`; nothing here runs a kernel. "
        '`"auto"` picks, per call, the accepting backend of highest priority.',
        "",
        "## Backends",
        "",
        "| backend | package | frameworks | devices | priority |",
        "|---|---|---|---|---|",
    ]
    seen = set()
    for c in cols:
        if c.backend in seen:
            continue
        seen.add(c.backend)
        if c.obj is None:
            lines.append(f"| `{c.backend}` | `{c.package}` | {c.why_missing} | | |")
            continue
        devices = ", ".join(sorted(getattr(c.obj, "devices", ()))) or "-"
        lines.append(
            f"| `{c.backend}` | `{c.package}` | {', '.join(sorted(c.obj.frameworks))} | "
            f"{devices} | {getattr(c.obj, 'priority', 0)} |"
        )
    lines += [
        "",
        "The cuda column describes a full build (every head dim and dtype it declares, XLA FFI "
        "for JAX); a reduced build (`LONGFLASH_HEAD_DIMS`, `LONGFLASH_DTYPES`) declines the "
        "rest with a reason of its own.",
        "",
        "## On an NVIDIA GPU",
        "",
        "Base call: bf16, head dim 128, 16 query and key/value heads, batch 2, 1024 tokens, no "
        "mask; each row changes what it names. No interpreter switch is set.",
        "",
    ]
    with _env(interpret=False):
        for section, rows in _rows():
            cells = [
                (label, [_cell(c, make(c.framework), notes) for c in cols]) for label, make in rows
            ]
            lines += _table(cols, section, cells) + [""]
    lines += [
        "## On the CPU",
        "",
        "The base call on CPU tensors. The triton and pallas kernels run on the CPU only in "
        "their interpreters (for tests; slow), behind `TRITON_INTERPRET=1` and "
        "`LONGFLASH_PALLAS_INTERPRET=1`.",
        "",
    ]
    cpu_rows = []
    for interpret, where in ((False, "default"), (True, "interpreters on")):
        with _env(interpret=interpret):
            for dt in ("bfloat16", "float32"):
                cpu_rows.append(
                    (
                        f"{dt}, {where}",
                        [
                            _cell(c, _call(framework=c.framework, device="cpu", dtype=dt), notes)
                            for c in cols
                        ],
                    )
                )
    lines += _table(cols, "CPU", cpu_rows) + ["", "## Reasons", ""]
    lines += [f"{n}. {text}" for text, n in notes.items.items()]
    return "\n".join(lines) + "\n"


# -- mkdocs hook ------------------------------------------------------------------------------
def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri == PAGE.name:
        return render()
    return markdown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if PAGE.read_text() != text:
            print(f"{PAGE} is stale: run python docs/gen_support_matrix.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
