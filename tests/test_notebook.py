"""examples/quickstart.ipynb, executed in a real Jupyter kernel: every cell runs without an error output, and the
cells that end with a pipeline output or ``show(...)`` hold an inline video (HTML with an inlined GIF)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_shows_videos_inline(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors[0].get("evalue") if errors else ""

    def html(cell) -> str:
        return "".join(out.get("data", {}).get("text/html", "") for out in cell.outputs)

    assert "Pipeline(the bundled demo model" in code[0].outputs[-1]["data"]["text/plain"]
    for index, videos in ((1, 1), (2, 3), (3, 1), (4, 1)):
        shown = html(code[index])
        assert shown.count('<img src="data:image/gif;base64,') == videos, f"cell {index}: {shown[:200]}"
    assert "a yellow circle moves to the left" in html(code[2])
    # progress bars are notebook widgets there (tqdm.auto with ipywidgets), not text lines on stderr
    for index in (1, 2, 4):
        kinds = [key for out in code[index].outputs for key in out.get("data", {})]
        assert "application/vnd.jupyter.widget-view+json" in kinds, f"cell {index}: {kinds}"
        assert not [out for out in code[index].outputs if out.output_type == "stream" and out.name == "stderr"]
    assert (tmp_path / "blue_square.mp4").stat().st_size > 0
