"""Loading the golden test vectors of ../shared/golden (made with the official PyTorch code)."""
from __future__ import annotations

import json
import pathlib

import numpy as np
from safetensors.numpy import load_file

GOLDEN = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def cases(family_filter=None) -> list[str]:
  names = sorted(p.stem for p in GOLDEN.glob("*.json") if p.stem != "README")
  if family_filter:
    names = [n for n in names if family_filter(json.loads((GOLDEN / f"{n}.json").read_text())["family"])]
  return names


def load(case: str):
  meta = json.loads((GOLDEN / f"{case}.json").read_text())
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
