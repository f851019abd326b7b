"""The tutorials run top to bottom in a real Jupyter kernel, on the shipped testbed models, offline."""

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from vlmsae.testbed import models

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("*.ipynb"))
NEEDS = {"01_record_and_explore": ("captioner", "llava_qa"), "02_train_and_evaluate": ("llava_qa",),
         "03_ablate_and_steer": ("captioner",)}
"""The shipped testbed models each tutorial loads."""


def test_there_are_three_tutorials_stored_without_outputs():
    assert [p.name for p in TUTORIALS] == ["01_record_and_explore.ipynb", "02_train_and_evaluate.ipynb",
                                           "03_ablate_and_steer.ipynb"]
    for path in TUTORIALS:
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} is stored with outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path):
    missing = [name for name in NEEDS[path.stem] if not (models.MODELS_DIR / name).is_dir()]
    if missing:
        pytest.skip(f"testbed model(s) {missing} are not in {models.MODELS_DIR}; train them with "
                    "`python -m vlmsae.testbed train captioner|qa`")
    book = nbformat.read(path, as_version=4)
    client = NotebookClient(book, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})  # relative writes land in tmp_path
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell and the traceback
    print(f"{path.name}: {time.perf_counter() - start:.0f} s")
    errors = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
