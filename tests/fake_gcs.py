"""A fake Google Cloud Storage for tests: `gs://BUCKET/...` paths work, and local-only file APIs used on them fail.

`with fake_gcs(root) as bucket:` makes every `gs://` path live under the local folder `root` (`gs://b/x` is
`root/b/x`) for the three ways a program reaches a bucket:
- `etils.epath` (everything this project reads and writes, and Orbax's own files): a backend that maps the
  path and, like tf.io.gfile, hands out files only inside a `with` block;
- TensorStore, which writes Orbax's arrays with its own GCS driver: its kvstore spec becomes a local `file` one;
- TensorFlow's event-file writer (`tf.summary.create_file_writer`), which has its own GCS client.
Meanwhile `open`, `os.*` (open, stat, makedirs, listdir, replace, ...) and `shutil` called from this
repository's code with a path that names a bucket (`gs://...`, or what `os.path.abspath` makes of it,
`$PWD/gs:/...`) record a violation and raise: those only ever reach the local disk. `bucket.violations` lists
them (a caller may swallow the exception); leaving the block asserts there are none and that no local `gs:`
folder appeared in the working directory (which catches a write by anyone). Libraries are not judged: Orbax
asks `os.path.islink` of gs:// paths (False, as on real GCS) from a worker thread.
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import os
import shutil
import sys
from unittest import mock

from etils.epath import backend as epath_backend
from etils.epath import gpath

PREFIX = "gs://"
_MARK = "gs:/"          # in a gs:// URI and in the local path os.path.abspath makes of it
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_SITE = ("site-packages", "dist-packages")


@dataclasses.dataclass
class Bucket:
  root: str
  violations: list = dataclasses.field(default_factory=list)

  def local(self, path) -> str:
    """The local file behind a gs:// path."""
    p = os.fspath(path)
    assert p.startswith(PREFIX), p
    return os.path.join(self.root, p[len(PREFIX):])

  def uri(self, local: str) -> str:
    return PREFIX + os.path.relpath(local, self.root)


class _Backend:
  """epath's backend for gs:// paths of the fake: the os backend on the mapped local path."""

  def __init__(self, bucket: Bucket):
    self.b, self.os = bucket, epath_backend.os_backend

  @contextlib.contextmanager
  def open(self, path, mode):         # a file object only inside `with`, as tf.io.gfile's backend gives it
    with self.os.open(self.b.local(path), mode) as f:
      yield f

  def exists(self, path):
    return self.os.exists(self.b.local(path))

  def isdir(self, path):
    return self.os.isdir(self.b.local(path))

  def listdir(self, path):
    return self.os.listdir(self.b.local(path))

  def glob(self, pattern):
    return [self.b.uri(p) for p in self.os.glob(self.b.local(pattern))]

  def walk(self, top, *, top_down=True, on_error=None):
    for root, dirs, files in self.os.walk(self.b.local(top), top_down=top_down, on_error=on_error):
      yield self.b.uri(root), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return self.os.makedirs(self.b.local(path), exist_ok=exist_ok)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return self.os.mkdir(self.b.local(path), exist_ok=exist_ok)

  def rmtree(self, path):
    return self.os.rmtree(self.b.local(path))

  def remove(self, path):
    return self.os.remove(self.b.local(path))

  def rename(self, path, dst):
    return self.os.rename(self.b.local(path), self.b.local(dst))

  def replace(self, path, dst):
    return self.os.replace(self.b.local(path), self.b.local(dst))

  def copy(self, path, dst, *, overwrite):
    return self.os.copy(self.b.local(path), self.b.local(dst), overwrite=overwrite)

  def stat(self, path):
    return self.os.stat(self.b.local(path))


def _names_bucket(arg) -> bool:
  try:
    p = os.fspath(arg)
  except TypeError:
    return False
  return (_MARK if isinstance(p, str) else _MARK.encode()) in p


def _called_from_repo() -> bool:
  """Whether the nearest caller outside the standard library (and this file) is this repository's code."""
  f = sys._getframe(2)
  while f is not None:
    name = f.f_code.co_filename
    if name.startswith(_REPO) and name != __file__ and not any(s in name for s in _SITE):
      return True
    if any(s in name for s in _SITE):
      return False
    f = f.f_back
  return False


def _guarded(bucket: Bucket, name: str, fn, nargs: int):
  def wrapper(*args, **kwargs):
    for a in args[:nargs]:
      if _names_bucket(a) and _called_from_repo():
        bucket.violations.append(f"{name}({os.fspath(a)!r})")
        raise AssertionError(f"local-only API {name} used on a bucket path {os.fspath(a)!r}")
    return fn(*args, **kwargs)
  return wrapper


# Local-only APIs and how many leading arguments are paths.
_GUARDED = [(builtins, "open", 1), (os, "open", 1), (os, "stat", 1), (os, "lstat", 1), (os, "makedirs", 1),
            (os, "mkdir", 1), (os, "listdir", 1), (os, "scandir", 1), (os, "remove", 1), (os, "unlink", 1),
            (os, "rmdir", 1), (os, "rename", 2), (os, "replace", 2), (os, "walk", 1), (shutil, "move", 2),
            (shutil, "rmtree", 1), (shutil, "copy", 2), (shutil, "copy2", 2), (shutil, "copyfile", 2),
            (shutil, "copytree", 2)]


@contextlib.contextmanager
def fake_gcs(root):
  """See the module docstring. Yields the Bucket (`.local(uri)` is where a gs:// object lives)."""
  from orbax.checkpoint._src.path import gcs_utils
  import tensorflow as tf
  bucket = Bucket(str(root))
  os.makedirs(bucket.root, exist_ok=True)
  fake_backend = _Backend(bucket)
  real_backend = gpath._GPath._backend
  real_kvstore = gcs_utils.get_kvstore_for_gcs
  real_writer = tf.summary.create_file_writer

  def backend(self):
    return fake_backend if self._uri_scheme == "gs" else real_backend.fget(self)

  def kvstore(path):
    spec = real_kvstore(path)           # {'driver': 'gcs', 'bucket': ..., 'path': ...}
    return {"driver": "file", "path": bucket.local(f"{PREFIX}{spec['bucket']}/{spec['path']}")}

  def writer(logdir, *a, **k):
    return real_writer(bucket.local(logdir) if str(logdir).startswith(PREFIX) else logdir, *a, **k)

  cwd_before = set(os.listdir("."))
  with contextlib.ExitStack() as stack:
    stack.enter_context(mock.patch.object(gpath._GPath, "_backend", property(backend)))
    stack.enter_context(mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore))
    stack.enter_context(mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False))
    stack.enter_context(mock.patch.object(tf.summary, "create_file_writer", writer))
    for module, name, nargs in _GUARDED:
      stack.enter_context(mock.patch.object(module, name, _guarded(bucket, name, getattr(module, name), nargs)))
    yield bucket
  assert not bucket.violations, f"local-only file APIs used on bucket paths: {bucket.violations}"
  stray = {n for n in set(os.listdir(".")) - cwd_before if n.startswith("gs:")}
  assert not stray, f"bucket paths written as local folders: {stray}"
