"""mkdocs hook: the benchmark plots in ``bench/results/`` become part of the site.

The plots live next to the JSON they were drawn from, outside ``docs/``; this copies every
``bench/results/*.png`` into the site as ``bench-results/<name>.png`` so the benchmark pages
can show them without a second copy in git (``make demo``'s own ``demo.png`` included, when a
local run wrote one).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def on_files(files: Files, config) -> Files:
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"bench-results/{png.name}", abs_src_path=str(png)))
    return files
