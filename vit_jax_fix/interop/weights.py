"""Pretrained weights by name: find, download once, verify, load.

`resolve(source)` turns a registered model name, a local path or an http(s) URL into a local file:

1. A path that exists is returned as is.
2. A registered name takes its row of the weights table (`registry.Weights`, filled in `models/zoo.py`: the
   URL from the authors' README, the file name, the key layout, the sha256 or its prefix); a URL stands for
   itself, its file name being the last path component.
3. The cache `$VIT_JAX_FIX_CACHE/weights/<file name>` (default `~/.cache/vit_jax_fix/weights/`): a file there
   is used without any request. Files are keyed by their file name, as torch.hub does.
4. A mirror, `VIT_JAX_FIX_WEIGHTS_MIRROR` = a directory (its `<file name>` is used in place, nothing is
   copied) or an http(s) base URL (`<base>/<file name>` is downloaded into the cache): clusters without
   internet keep one copy of the files somewhere reachable.
5. The URL itself, downloaded into the cache, unless it is a link that needs a browser (Google Drive, Baidu
   Pan): then `ManualDownloadRequired` says where to get the file and the exact path to put it at.

Downloads stream (urllib, `timeout` seconds per socket operation) into a temporary file in the cache
directory with a tqdm progress bar, hash while writing, and are renamed onto the final name only when
complete (every byte the server announced) and verified: an interrupted download or a checksum mismatch
leaves nothing in the cache. The checksum is the table's sha256 (full or prefix) or, for a file name of the
torch.hub form `name-<hex>.ext` (DeiT's `deit_tiny_patch16_224-a1311bcf.pth`), that hex prefix, which must
begin the file's sha256 exactly as `torch.hub.load_state_dict_from_url(check_hash=True)` checks it. A cached
or mirrored file with a known checksum is verified too (it may have been put there by hand).

`load_pretrained(name, True | PATH | URL, **overrides)` resolves and loads through
`checkpoint_io.load_torch` with the table's layout for `True` ('auto' detection for other files). The
weights define the classifier: `num_classes` other than the file's is refused with a clear message (the
trainer's `init_from` re-initialises a head of another size; `create_model` does not invent weights).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from vit_jax_fix import errors

CACHE_ENV = "VIT_JAX_FIX_CACHE"
MIRROR_ENV = "VIT_JAX_FIX_WEIGHTS_MIRROR"
DEFAULT_TIMEOUT = 60.0
_CHUNK = 1 << 20
# torch.hub's convention: the part after the last '-' of the file stem is a prefix of the file's sha256.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")


class WeightsError(errors.UserError, RuntimeError):
  """Pretrained weights could not be had; the message says what to do (the CLIs print it and exit 1)."""


class NoPretrainedWeights(WeightsError, KeyError):
  """A registered model whose authors released no weights."""
  exit_code = 2   # the name asked for cannot work


class WeightsDownloadError(WeightsError):
  """The file could not be downloaded (offline, server error, interrupted); see `.url` and `.path`."""

  def __init__(self, message: str, url: str = "", path: str = ""):
    super().__init__(message)
    self.url, self.path = url, path


class ManualDownloadRequired(WeightsDownloadError):
  """A link that needs a browser (Google Drive, Baidu Pan): download by hand and put the file at `.path`."""


class ChecksumMismatch(WeightsError, ValueError):
  """The file's sha256 does not match the expected digest or prefix; nothing was cached."""


# ----------------------------------------------------------------------------------------- locations

def cache_dir() -> str:
  """Where downloaded weights live: `$VIT_JAX_FIX_CACHE/weights` (default ~/.cache/vit_jax_fix/weights)."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vit_jax_fix")
  return os.path.join(root, "weights")


def cache_path(file_name: str) -> str:
  """The exact path a file of this name is cached at (and where to put it by hand)."""
  return os.path.join(cache_dir(), file_name)


def hash_prefix(file_name: str) -> str:
  """The sha256 prefix a torch.hub-style file name carries ('' if none): 'x-a1311bcf.pth' -> 'a1311bcf'."""
  m = _HASH_IN_NAME.search(file_name)
  return m.group(1) if m else ""


def needs_browser(url: str) -> bool:
  from vit_jax_fix.models.registry import BROWSER_HOSTS
  return urllib.parse.urlparse(url).hostname in BROWSER_HOSTS


def _is_url(source: str) -> bool:
  return source.startswith(("http://", "https://"))


def _file_name_of(url: str) -> str:
  name = os.path.basename(urllib.parse.urlparse(url).path)
  if not name:
    raise WeightsError(f"{url}: the URL names no file (it should end in e.g. /model.pth)")
  return name


# ------------------------------------------------------------------------------------------- checking

def sha256_of(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def _check(digest: str, expected: str, what: str, url: str) -> None:
  """torch.hub's check: the expected (full digest or prefix) must begin the actual sha256."""
  if expected and not digest.startswith(expected.lower()):
    raise ChecksumMismatch(
        f"{what}: sha256 {digest} does not begin with the expected {expected} (from {url or 'the table'}). "
        f"The file is corrupt, truncated, or not the published one; it was not used.")


def _verify_file(path: str, expected: str, url: str) -> None:
  if expected:
    try:
      _check(sha256_of(path), expected, path, url)
    except ChecksumMismatch as e:
      raise ChecksumMismatch(f"{e} Delete it (or replace it with the published file): {path}") from None


# ---------------------------------------------------------------------------------------- downloading

def _offline_message(url: str, path: str, reason: str) -> str:
  return (f"could not download {url} ({reason}). If this machine has no internet access, download the file "
          f"elsewhere and put it at {path} , or set {MIRROR_ENV} to a directory or http(s) URL that serves "
          f"{os.path.basename(path)}.")


def download(url: str, path: str, *, sha256: str = "", progress: bool = True,
             timeout: float = DEFAULT_TIMEOUT) -> str:
  """Download `url` to `path` through a temporary file in the same directory, renamed when complete and
  verified (see the module docstring). Returns `path`."""
  from tqdm.auto import tqdm
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  request = urllib.request.Request(url, headers={"User-Agent": "vit_jax_fix"})
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=directory)
  try:
    with os.fdopen(fd, "wb") as out:
      try:
        response = urllib.request.urlopen(request, timeout=timeout)
      except urllib.error.HTTPError as e:
        raise WeightsDownloadError(_offline_message(url, path, f"the server answered HTTP {e.code} {e.reason}"),
                                   url, path) from None
      except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise WeightsDownloadError(_offline_message(url, path, f"{type(e).__name__}: {reason}"),
                                   url, path) from None
      with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        h, received = hashlib.sha256(), 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=os.path.basename(path),
                  disable=not progress, dynamic_ncols=True, mininterval=0.5) as bar:
          while True:
            try:
              chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
              raise WeightsDownloadError(_offline_message(
                  url, path, f"interrupted after {received} bytes: {type(e).__name__}"), url, path) from None
            if not chunk:
              break
            out.write(chunk)
            h.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if total is not None and received != total:
      raise WeightsDownloadError(_offline_message(
          url, path, f"interrupted: {received} of {total} bytes received"), url, path)
    _check(h.hexdigest(), sha256, f"{url} (downloaded)", url)
    os.replace(tmp, path)
    tmp = None
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
  return path


# ------------------------------------------------------------------------------------------ resolving

def _from_mirror(file_name: str, sha256: str, *, progress: bool, timeout: float) -> str | None:
  mirror = os.environ.get(MIRROR_ENV, "").strip()
  if not mirror:
    return None
  if _is_url(mirror):
    url = mirror.rstrip("/") + "/" + urllib.parse.quote(file_name)
    try:
      return download(url, cache_path(file_name), sha256=sha256, progress=progress, timeout=timeout)
    except WeightsDownloadError:
      return None  # not in the mirror (or the mirror is down): the origin is tried, and its error reported
  local = os.path.join(os.path.expanduser(mirror), file_name)
  if os.path.isfile(local):
    _verify_file(local, sha256, mirror)
    return local
  return None


def resolve(source: str, *, progress: bool = True, timeout: float = DEFAULT_TIMEOUT) -> str:
  """A local file for a registered model name, a local path or an http(s) URL (module docstring)."""
  from vit_jax_fix.models import registry
  source = os.fspath(source)
  if os.path.isfile(source):
    return source
  if _is_url(source):
    url, file_name, expected, what, note = source, _file_name_of(source), "", source, ""
  elif os.sep in source or source.endswith((".pth", ".pt", ".bin", ".safetensors", ".npz")):
    raise errors.MissingFileError(f"no such weights file: {source}")
  else:
    spec = registry.get_spec(source)  # an unknown name is a KeyError naming the nearest ones
    w = spec.weights
    if w is None:
      raise NoPretrainedWeights(
          f"{source}: its authors released no weights (or none this library lists). Models with weights: "
          f"{', '.join(registry.pretrained_models())}. Give a file or URL instead (pretrained='PATH').")
    url, file_name, expected, what, note = w.url, w.file_name, w.sha256, f"{source} ({w.url})", w.note
  expected = expected or hash_prefix(file_name)

  path = cache_path(file_name)
  if os.path.isfile(path):
    _verify_file(path, expected, url)
    return path
  found = _from_mirror(file_name, expected, progress=progress, timeout=timeout)
  if found:
    return found
  if needs_browser(url):
    raise ManualDownloadRequired(
        f"{what}: this link needs a web browser (it opens a page, not the file). Download the file by hand"
        f"{f' ({note})' if note else ''} and save it as {path} , or put {file_name} in the directory (or "
        f"behind the http URL) named by {MIRROR_ENV}.", url, path)
  return download(url, path, sha256=expected, progress=progress, timeout=timeout)


def released(name: str, *, progress: bool = True) -> tuple[str, str]:
  """(local file, key layout) of the authors' released weights of registered `name`: `resolve(name)` and the
  weights table's layout. What `pretrained=True`, `init_from.pretrained`, `evaluate --pretrained` and
  `convert from-torch --name` read."""
  from vit_jax_fix.models import registry
  path = resolve(name, progress=progress)
  return path, registry.get_spec(name).weights.layout


# -------------------------------------------------------------------------------------------- loading

def load_pretrained(name: str, source: bool | str = True, *, layout: str | None = None, ema: bool | None = None,
                    allow_pickle: bool = False, progress: bool = True, **overrides):
  """`create_model(name, **overrides)` with the weights of `source` (True: the table's file for `name`;
  else a path or URL). `layout` defaults to the table's for True, else detection ('auto')."""
  from vit_jax_fix.interop.checkpoint_io import load_torch
  from vit_jax_fix.interop.state_dict import StateDictMismatch
  if source is True:
    path, table_layout = released(name, progress=progress)
    layout = layout or table_layout
  elif isinstance(source, (str, os.PathLike)):
    path = resolve(os.fspath(source), progress=progress)
    layout = layout or "auto"
  else:
    raise TypeError(f"pretrained must be True, a path or a URL, got {source!r}")
  try:
    model, _ = load_torch(path, name, dict(overrides), layout=layout, ema=ema, allow_pickle=allow_pickle)
  except StateDictMismatch as e:
    m = re.search(r"head\.weight: checkpoint \((\d+),", str(e))
    if m and "num_classes" in overrides:
      raise StateDictMismatch(
          f"{path} has a {m.group(1)}-class head, and num_classes={overrides['num_classes']} was asked. Pretrained "
          f"loading keeps the released classifier: leave num_classes out, or fine-tune with the trainer "
          f"(config.init_from.pretrained=True re-initialises a head of another size).") from None
    raise
  return model
