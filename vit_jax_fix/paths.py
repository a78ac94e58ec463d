"""Paths on any filesystem: the one way workdirs, checkpoints, metrics and tool outputs are named.

Every file the trainer, `convert`, `evaluate` and `diagnose` write (and every workdir file they read) goes through
`etils.epath.Path`: a local path uses `os`, a URI (`gs://bucket/run`, `s3://...`) uses `tf.io.gfile` (or fsspec
without TensorFlow), so `--workdir gs://bucket/run` works like a local directory. Orbax takes the same paths
(and writes arrays with TensorStore's own GCS driver). Plain `open`, `os.path` and `shutil` see only the local
disk: `os.path.abspath('gs://b/run')` is `$PWD/gs:/b/run`, a local folder.

`as_path(p)`: a URI is kept as given; a local path is expanded (`~`) and made absolute, as the trainer always
did (Orbax wants absolute directories, and logs then name the place).
"""
from __future__ import annotations

import os

from etils import epath


def is_uri(path) -> bool:
  """True for `scheme://...` (gs, s3, ...): a path no local-only API can reach."""
  return "://" in os.fspath(path)


def as_path(path) -> epath.Path:
  p = epath.Path(path)
  return p if is_uri(p) else p.expanduser().resolve()
