"""mkdocs hook: figures from benchmarks/results/ on documentation pages.

Pages link a figure as ``../benchmarks/results/NAME.png``, the path that is right when
docs/ is read in the repository. benchmarks/ is outside mkdocs' docs_dir, so this hook adds
every PNG there to the site under ``results/`` and rewrites those links to match. No copy
of a figure is kept in docs/: the committed result is the one shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LINK = "../benchmarks/results/"


def _results_dir(config: Any) -> Path:
    return Path(config["config_file_path"]).resolve().parent / "benchmarks" / "results"


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for png in sorted(_results_dir(config).glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if LINK not in markdown:
        return markdown
    depth = page.file.src_uri.count("/")
    return markdown.replace(LINK, "../" * depth + "results/")
