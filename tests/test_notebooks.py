"""Every notebook in notebooks/ runs top to bottom in its small mode (VIT_JAX_FIX_NOTEBOOK_SMALL=1: tiny
models, a few training steps on the embedded demo set, no downloads), in a fresh python3 kernel, with its
outputs under a temporary workdir. Any cell error fails the test. The committed notebooks must be stripped of
outputs and match their generator (notebooks/build_notebooks.py).

Run just these:  python -m pytest tests/test_notebooks.py -q
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import nbformat
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 900


def kernel_env(workdir: pathlib.Path, data_dir: pathlib.Path) -> dict:
  env = dict(os.environ, VIT_JAX_FIX_NOTEBOOK_SMALL="1", VIT_JAX_FIX_NOTEBOOK_WORKDIR=str(workdir),
             VIT_JAX_FIX_DATA_DIR=str(data_dir), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
             JAX_PLATFORMS="cpu")
  # The notebooks run as a user's would: one CPU device, not the 8 simulated devices of the other tests.
  env.pop("JAX_NUM_CPU_DEVICES", None)
  env.pop("MPLBACKEND", None)  # the kernel's inline backend draws the figures
  env.pop("PYTEST_XDIST_WORKER", None)
  return env


def test_notebooks_found():
  assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "train_colab", "convert_to_pytorch"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs are not stripped"


def test_notebooks_match_generator():
  out = subprocess.run([sys.executable, str(NOTEBOOK_DIR / "build_notebooks.py"), "--check"],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, demo_data_dir):
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError

  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                          resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  try:
    client.execute(env=kernel_env(tmp_path / "workdir", demo_data_dir))
  except CellExecutionError as e:
    pytest.fail(f"{path.name} failed in small mode:\n{e}", pytrace=False)
  finally:
    # The executed copy (with outputs) for debugging; the repository keeps the stripped one.
    nbformat.write(nb, tmp_path / path.name)
