"""The data files the tests read. They ship with the repository in `tests/data/`, so a clone needs nothing
beside it:

- `golden/`: golden test vectors made with the official PyTorch code. Per case, `<case>.safetensors` holds a
  small official model's state dict, an input batch, its logits and block outputs; `<case>.json` says how it
  was made (official repository and commit, constructor arguments, tolerances, the file's SHA-256).
  `golden/README.md` documents the format and lists the cases.
- `state_dicts/`: the state-dict listings of the official full-size models (key, shape, dtype per line, then
  the parameter and buffer counts), from the official code at the commits listed in `state_dicts/README.md`.

`data_files` is the one way tests list these files. It raises when a folder holds none, so a test
parametrised over them stops at collection instead of running zero cases; test_testdata.py checks that the
lists hold exactly the files the READMEs name.
"""
from __future__ import annotations

import pathlib

DATA = pathlib.Path(__file__).resolve().parent / "data"
GOLDEN = DATA / "golden"
STATE_DICTS = DATA / "state_dicts"


def data_files(folder: pathlib.Path, suffix: str) -> list[pathlib.Path]:
  """The `*<suffix>` files of a test-data folder, sorted; FileNotFoundError when there are none."""
  files = sorted(folder.glob(f"*{suffix}"))
  if not files:
    raise FileNotFoundError(f"no *{suffix} files in {folder}: the test data ships with the repository "
                            "(tests/data); restore it from git (`git checkout -- tests/data`).")
  return files
