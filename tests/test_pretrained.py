"""Pretrained weights by name (vit_jax_fix.interop.weights + the registry's weights table).

Every download comes from a local HTTP server on 127.0.0.1 (an ephemeral port, in a thread) that serves
files this project exports and counts the requests; no test touches the internet. The cache is a temporary
directory ($VIT_JAX_FIX_CACHE) in every test.
"""
import dataclasses
import hashlib
import http.server
import os
import re
import shutil
import socket
import threading

import jax
import numpy as np
import pytest

import vit_jax_fix

from vit_jax_fix.interop import save_torch
from vit_jax_fix.interop import testing as itesting
from vit_jax_fix.interop import weights as W
from vit_jax_fix.models import registry

NAME = "deit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, depth=2, num_classes=5)


# ------------------------------------------------------------------------------------------- fixtures

class _Server:
  """Serves {url path: bytes}; '/short/<name>' announces 1000 bytes more than it sends, then hangs up."""

  def __init__(self):
    self.files, self.requests = {}, []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        outer.requests.append(self.path)
        short = self.path.startswith("/short/")
        body = outer.files.get(self.path[len("/short"):] if short else self.path)
        if body is None:
          self.send_error(404)
          return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) + (1000 if short else 0)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if short else body)
        self.close_connection = True

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def count(self, path):
    return sum(p == path for p in self.requests)


@pytest.fixture(scope="module")
def server():
  s = _Server()
  yield s
  s.httpd.shutdown()
  s.httpd.server_close()


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A tiny DeiT with random (non-init) weights, exported to .pth and .safetensors; the .pth named with
  its sha256 prefix like DeiT's files. Returns (model, {'pth': (file name, bytes), 'st': ...})."""
  d = tmp_path_factory.mktemp("export")
  model = itesting.random_model(NAME, **TINY)
  save_torch(model, str(d / "m.pth"), name=NAME, overrides=TINY, layout="official")
  save_torch(model, str(d / "m.safetensors"), name=NAME, overrides=TINY, layout="official")
  pth = (d / "m.pth").read_bytes()
  return model, {"pth": (f"tiny-{_sha(pth)[:8]}.pth", pth),
                 "st": ("tiny.safetensors", (d / "m.safetensors").read_bytes())}


@pytest.fixture
def cache(tmp_path, monkeypatch):
  root = tmp_path / "cache"
  monkeypatch.setenv(W.CACHE_ENV, str(root))
  monkeypatch.delenv(W.MIRROR_ENV, raising=False)
  return root / "weights"


def _serve(server, exported, kind="pth", prefix=""):
  file_name, data = exported[1][kind]
  path = f"{prefix}/{file_name}"
  server.files[path] = data
  return server.url + path, file_name, data


def _files(directory):
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def _closed_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _patch_row(monkeypatch, name, **fields):
  """Point a registered name's weights row at the test server (the table is the registry's ModelSpec)."""
  registry.list_models()
  spec = registry.get_spec(name)
  row = registry.Weights(**{"url": "", "file_name": "", **fields})
  monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(spec, weights=row))
  return row


def _logits(model):
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  return itesting.logits(model, x)


# ------------------------------------------------------------------------------------------ downloads

def test_download_progress_then_cache_hit_without_request(server, exported, cache, capsys):
  url, file_name, data = _serve(server, exported, prefix="/dl")
  path = W.resolve(url)
  assert path == str(cache / file_name) and open(path, "rb").read() == data
  err = capsys.readouterr().err
  assert file_name in err and "100%" in err                     # the tqdm bar
  assert server.count(f"/dl/{file_name}") == 1
  assert _files(cache) == [file_name]                           # no temporary file left
  assert W.resolve(url) == path                                 # cache hit: no second request
  assert server.count(f"/dl/{file_name}") == 1
  assert W.resolve(path) == path                                # a local path is returned as is


def test_checksum_mismatch_refused_and_nothing_cached(server, exported, cache, monkeypatch):
  _, data = exported[1]["pth"]
  server.files["/bad/tiny-00000000.pth"] = data                 # a name whose hash prefix is wrong
  with pytest.raises(W.ChecksumMismatch, match="does not begin with the expected 00000000"):
    W.resolve(server.url + "/bad/tiny-00000000.pth")
  assert _files(cache) == []
  # The table's checksum (file name without a hash): also checked, also nothing cached.
  server.files["/bad/plain.pth"] = data
  _patch_row(monkeypatch, NAME, url=server.url + "/bad/plain.pth", file_name="plain.pth", sha256="deadbeef")
  with pytest.raises(W.ChecksumMismatch, match="deadbeef"):
    W.resolve(NAME)
  assert _files(cache) == []
  # The right prefix passes; a full digest too.
  _patch_row(monkeypatch, NAME, url=server.url + "/bad/plain.pth", file_name="plain.pth", sha256=_sha(data))
  assert open(W.resolve(NAME), "rb").read() == data


def test_interrupted_download_leaves_no_file(server, exported, cache):
  url, file_name, _ = _serve(server, exported, prefix="/cut")
  short = url.replace("/cut/", "/short/cut/")
  with pytest.raises(W.WeightsDownloadError, match="interrupted") as e:
    W.resolve(short)
  assert e.value.url == short and e.value.path == str(cache / file_name)
  assert _files(cache) == []                                    # neither the file nor a .part


def test_offline_error_names_url_and_where_to_put_the_file(cache):
  url = f"http://127.0.0.1:{_closed_port()}/deit_tiny_patch16_224-a1311bcf.pth"
  with pytest.raises(W.WeightsDownloadError) as e:
    W.resolve(url, timeout=5)
  msg = str(e.value)
  target = str(cache / "deit_tiny_patch16_224-a1311bcf.pth")
  assert url in msg and target in msg and W.MIRROR_ENV in msg and "Connection refused" in msg
  assert _files(cache) == []


def test_browser_link_error_then_file_put_by_hand(exported, cache, monkeypatch):
  # The real table: DeepViT-S is on Google Drive only. No request is made (the URL is not fetched).
  w = registry.get_spec("deepvit_S").weights
  with pytest.raises(W.ManualDownloadRequired) as e:
    W.resolve("deepvit_S")
  target = str(cache / w.file_name)
  assert w.url in str(e.value) and target in str(e.value) and e.value.path == target
  assert "browser" in str(e.value)
  # Done as the message says: the file at that path is used.
  _, data = exported[1]["pth"]
  os.makedirs(cache, exist_ok=True)
  with open(target, "wb") as f:
    f.write(data)
  assert W.resolve("deepvit_S") == target
  # A Drive URL given directly is recognised too.
  with pytest.raises(W.ManualDownloadRequired, match="drive.google.com"):
    W.resolve("https://drive.google.com/file/d/XYZ/view?usp=sharing")


def test_mirror_directory_and_url(server, exported, cache, tmp_path, monkeypatch):
  file_name, data = exported[1]["pth"]
  dead = f"http://127.0.0.1:{_closed_port()}/{file_name}"      # the origin is unreachable
  _patch_row(monkeypatch, NAME, url=dead, file_name=file_name, sha256=W.hash_prefix(file_name))
  # A directory: its file is used in place, nothing is copied or requested.
  mirror = tmp_path / "mirror"
  mirror.mkdir()
  (mirror / file_name).write_bytes(data)
  monkeypatch.setenv(W.MIRROR_ENV, str(mirror))
  assert W.resolve(NAME) == str(mirror / file_name)
  assert _files(cache) == []
  (mirror / file_name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))   # a damaged mirror copy is refused
  with pytest.raises(W.ChecksumMismatch):
    W.resolve(NAME)
  # An http base URL: <base>/<file name> is downloaded into the cache, once.
  server.files[f"/mirror/{file_name}"] = data
  monkeypatch.setenv(W.MIRROR_ENV, server.url + "/mirror/")
  assert W.resolve(NAME) == str(cache / file_name)
  assert W.resolve(NAME) == str(cache / file_name)
  assert server.count(f"/mirror/{file_name}") == 1
  # Not in the mirror, origin down: the origin's error says where to put the file.
  _patch_row(monkeypatch, NAME, url=dead.replace(file_name, "other.pth"), file_name="other.pth")
  with pytest.raises(W.WeightsDownloadError, match=re.escape(str(cache / "other.pth"))):
    W.resolve(NAME, timeout=5)


def test_names_without_weights_and_unknown_names(cache):
  with pytest.raises(W.NoPretrainedWeights, match="augvit_small: its authors released no weights"):
    W.resolve("augvit_small")
  with pytest.raises(KeyError, match="deit_small_patch16_224"):
    W.resolve("deit_smal_patch16_224")
  with pytest.raises(FileNotFoundError):
    W.resolve("/no/such/file.pth")


# -------------------------------------------------------------------------------------------- loading

def test_create_model_pretrained_equals_exported(server, exported, cache, monkeypatch):
  model = exported[0]
  want = _logits(model)
  arch = {k: v for k, v in TINY.items() if k != "num_classes"}   # num_classes comes from the file
  url, file_name, _ = _serve(server, exported, prefix="/load")
  got = vit_jax_fix.create_model(NAME, pretrained=url, **arch)
  np.testing.assert_array_equal(_logits(got), want)
  st_url, _, _ = _serve(server, exported, kind="st", prefix="/load")
  np.testing.assert_array_equal(_logits(vit_jax_fix.create_model(NAME, pretrained=st_url, **arch)), want)
  # pretrained=True: the table's row (patched to the local server) with its layout.
  _patch_row(monkeypatch, NAME, url=url, file_name=file_name, sha256=W.hash_prefix(file_name))
  got = vit_jax_fix.create_model(NAME, pretrained=True, **arch)
  np.testing.assert_array_equal(_logits(got), want)
  assert server.count(f"/load/{file_name}") == 1                # the second load came from the cache
  # The weights define the classifier: another class count is a clear error.
  with pytest.raises(ValueError, match="5-class head, and num_classes=7 was asked"):
    vit_jax_fix.create_model(NAME, pretrained=True, **arch, num_classes=7)


@pytest.mark.slow
def test_trainer_init_from_pretrained(server, cache, monkeypatch, tmp_path):
  """config.init_from.pretrained=True through the training loop (one step at lr 0, EMA on): the run's
  parameters are the table's file, fetched once."""
  from tests import train_configs
  from vit_jax_fix.train import checkpoint as ckpt
  from vit_jax_fix.train import loop
  from vit_jax_fix.train import sharding as S
  tiny = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
  src = itesting.random_model("deit_small_patch16_224", **tiny, num_classes=3)
  path = tmp_path / "src.pth"
  save_torch(src, str(path), name="deit_small_patch16_224", overrides=dict(tiny, num_classes=3))
  data = path.read_bytes()
  file_name = f"src-{_sha(data)[:8]}.pth"
  server.files[f"/train/{file_name}"] = data
  _patch_row(monkeypatch, "deit_small_patch16_224", url=f"{server.url}/train/{file_name}", file_name=file_name,
             sha256=W.hash_prefix(file_name))

  folder = train_configs.make_folder(tmp_path)
  c = train_configs.folder_config(folder, model="deit_small_patch16_224", overrides=tiny, **{
      "total_steps": 1, "optimizer.lr": 0.0, "optimizer.weight_decay": 0.0, "schedule.warmup_steps": 0,
      "checkpoint_every_steps": 1, "mesh.data": 2})
  assert c.init_from.pretrained is False                        # the key exists, off by default
  c.init_from.pretrained = True
  loop.train_and_evaluate(c, str(tmp_path / "wd"), mesh=S.make_mesh(2, 1, devices=jax.devices()[:2]))
  params = ckpt.load_state_dicts(str(tmp_path / "wd"))[2]
  from vit_jax_fix.train.finetune import _pure
  want = _pure(src)[0]
  # lr 0: the trained parameters are the downloaded ones (3 classes: the head is kept).
  for got_leaf, want_leaf in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(got_leaf, want_leaf)
  assert jax.tree.structure(params) == jax.tree.structure(want)
  assert server.count(f"/train/{file_name}") == 1

  c.init_from.path = str(path)
  from vit_jax_fix.train import finetune
  with pytest.raises(ValueError, match="init_from.path or init_from.pretrained, not both"):
    finetune.load_pretrained(c, None, {}, {})


# ---------------------------------------------------------------------------------------------- table

def test_weights_table_rows():
  names = registry.pretrained_models()
  assert {"deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "deit_small_patch16_LS",
          "deit3_base_patch16_224", "cait_S24_224", "cait_XXS24_224", "attnscale_small_12",
          "featscale_cait_XXS24_224", "deit_small_patch16_shrink_base", "deepvit_S", "shunted_b"} <= set(names)
  assert not [n for n in names if n.startswith("augvit")]       # AugViT's authors published no weights
  hashed = 0
  for name in names:
    w = registry.get_spec(name).weights
    assert name in registry.list_models()
    assert w.file_name and "/" not in w.file_name and w.file_name.endswith((".pth", ".safetensors"))
    assert w.layout in ("official", "timm")
    assert w.url.startswith("https://") and w.source
    assert re.fullmatch(r"[0-9a-f]*", w.sha256)
    if W.hash_prefix(w.file_name):
      assert w.sha256 == W.hash_prefix(w.file_name), name        # torch.hub's check, kept in the table
      hashed += 1
    if not w.needs_browser:                                      # direct links: the URL names the file
      assert W._file_name_of(w.url) == w.file_name, name
  assert hashed == 7                                             # DeiT: three plain, three distilled, the teacher
