"""Loading the golden test vectors of tests/data/golden (made with the official PyTorch code at the commit each
case's JSON records; the format is in tests/data/golden/README.md)."""
from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load_file

from tests.testdata import GOLDEN, data_files


def cases(family_filter=None) -> list[str]:
  """Every golden case (FileNotFoundError when there is none), or those whose family passes the filter."""
  names = [p.stem for p in data_files(GOLDEN, ".json")]
  if family_filter:
    names = [n for n in names if family_filter(metadata(n)["family"])]
  return names


def metadata(case: str) -> dict:
  """A case's JSON: how it was made (official repository and commit, constructor arguments, tolerances...)."""
  return json.loads((GOLDEN / f"{case}.json").read_text())


def load(case: str):
  meta = metadata(case)
  tensors = load_file(str(GOLDEN / f"{case}.safetensors"))
  state = {k: v for k, v in tensors.items() if not k.startswith("__")}
  outputs = {k: v for k, v in tensors.items() if k.startswith("__")}
  return meta, state, outputs


def registered_name(meta) -> str:
  """The registered name a golden case is a small version of ('deit_small_patch16_224 (dims changed)')."""
  return meta["constructor"]["equivalent_registered"].split()[0].split("(")[0]


def nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1))


def logits_tol(ref: np.ndarray) -> float:
  return 1e-5 + 1e-5 * float(np.max(np.abs(ref)))


def block_tol(ref: np.ndarray) -> float:
  return 1e-5 * max(1.0, float(np.max(np.abs(ref))))
