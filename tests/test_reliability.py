"""Reliability (issue #10): each test provokes a fault and checks the run loses nothing and explains itself.

Covered elsewhere (not repeated here): a single kill -9 + bit-identical resume and "finished workdir is not
trained again" (tests/test_train_e2e.py), ImageNet not prepared (test_train_e2e.test_imagenet_not_prepared_
fails_fast), unknown dataset / missing folder / empty folder / auto-download refusal (test_data_pipeline.
test_clear_errors), wrong split name (test_data_pipeline.test_unknown_split_is_reported), corrupt images and
odd modes decoded or skipped with a count (test_data_pipeline.test_folder_modes_and_corrupt_files_are_handled).
Here the trainer runs in-process on a 2-device mesh with a generated image folder, except the kill test,
which needs subprocesses (main.py through tests/train_runner.py on mocked imagenet2012). A workdir in a bucket
(issue #21): the reference run again on a fake Google Cloud Storage (tests/fake_gcs.py), crashed and resumed.
"""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vit_jax_fix import paths
from vit_jax_fix.data import testing as data_testing
from vit_jax_fix.train import checkpoint as ckpt
from vit_jax_fix.train import finetune
from tests import fake_gcs
from tests import train_configs
from tests.train_configs import logged_step
from tests.test_train_e2e import _tail
from vit_jax_fix.train import loop
from vit_jax_fix.train import metrics as metrics_lib
from vit_jax_fix.train import sharding as S
from vit_jax_fix.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "train_runner.py")
TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.1)

# Trainings in subprocesses with async Orbax saves: keep them on one xdist worker (never concurrent).
pytestmark = pytest.mark.xdist_group("training")


def _flat(tree):
  return np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])


# ------------------------------------------------------------------------------------------ in-process runs


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return train_configs.make_folder(tmp_path_factory.mktemp("rel_data"))


def _config(folder, **kw):
  c = train_configs.folder_config(folder, model="deit_small_patch16_224", overrides=TINY, **{
      "total_steps": 6, "schedule.warmup_steps": 2, "optimizer.lr": 1e-3, "ema.decay": 0.9,
      "data.label_smoothing": 0.1, "log_every_steps": 1, "checkpoint_every_steps": 2, "max_to_keep": 3,
      "mesh.data": 2})
  return train_configs.set_keys(c, **kw)


def _mesh():
  return S.make_mesh(2, 1, devices=jax.devices()[:2])


def _train(config, workdir):
  return loop.train_and_evaluate(config, str(workdir), mesh=_mesh())


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
  """One uninterrupted 6-step run (checkpoints 2, 4, 6): copied by the tests that damage it."""
  wd = tmp_path_factory.mktemp("rel_ref") / "ref"
  _train(_config(folder), wd)
  return wd


def _params(workdir, ema=False):
  return _flat(ckpt.load_state_dicts(str(workdir), ema=ema)[2])


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _corrupt(step_dir):
  """Truncates every data file of the saved state (what a full disk or a torn copy leaves)."""
  for d, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      with open(os.path.join(d, f), "r+b") as fh:
        fh.truncate(7)


def test_corrupt_checkpoint_skipped_then_clear_error(folder, reference, tmp_path, capsys):
  wd = _copy(reference, tmp_path / "w")
  cdir = wd / "checkpoints"
  _corrupt(cdir / "6")
  (cdir / "8.orbax-checkpoint-tmp-1234").mkdir()           # an unfinished save left by a kill
  (cdir / "8.orbax-checkpoint-tmp-1234" / "junk").write_bytes(b"x")
  _train(_config(folder), wd)                              # restores 4, trains 5..6 again
  out = capsys.readouterr().out
  assert f"checkpoint {cdir / '6'} is unreadable or incomplete" in out
  assert any(p.name.startswith("6-") for p in (wd / ckpt.QUARANTINE).iterdir())
  assert not (cdir / "8.orbax-checkpoint-tmp-1234").exists() and not (cdir / "8").exists()
  np.testing.assert_array_equal(_params(wd), _params(reference))
  np.testing.assert_array_equal(_params(wd, ema=True), _params(reference, ema=True))

  for step in (2, 4, 6):
    _corrupt(cdir / str(step))
  with pytest.raises(ckpt.NoUsableCheckpointError, match="none of the 3 checkpoint"):
    _train(_config(folder), wd)


def test_workdir_of_other_config_or_model_refused(folder, reference, tmp_path):
  wd = _copy(reference, tmp_path / "w")
  with pytest.raises(ckpt.ConfigMismatchError) as e:
    _train(_config(folder, **{"optimizer.lr": 2e-3, "seed": 1}), wd)
  msg = str(e.value)
  assert "refusing to resume" in msg and "optimizer.lr: 0.001 in the workdir, 0.002 now" in msg
  assert "seed: 0 in the workdir, 1 now" in msg and "new --workdir" in msg
  # Bookkeeping keys may change on resume (the finished run is simply reported).
  _train(_config(folder, log_every_steps=3, checkpoint_every_steps=3, debug_step_sleep=0.0), wd)

  # Without the saved config, the checkpoint itself says it holds another model: keys and shapes listed.
  os.remove(wd / "config.json")
  other = _config(folder, **{"model.overrides": dict(TINY, embed_dim=48, depth=2)})
  with pytest.raises(ckpt.CheckpointMismatchError) as e:
    _train(other, wd)
  msg = str(e.value)
  assert "params/block_stacks/0/attn/qkv/kernel: checkpoint (1, 32, 96) vs model (2, 48, 144)" in msg
  assert "init_from.path" in msg
  assert not (wd / ckpt.QUARANTINE).exists()               # a mismatch is not mistaken for corruption


def test_init_from_other_model_lists_keys(folder, reference):
  c = _config(folder, **{"model.overrides": dict(TINY, embed_dim=48, depth=2)})
  c.init_from.path = str(reference)
  md = state_lib.ModelDef.create(c.model.name, **dict(c.model.overrides, num_classes=3))
  p, s = jax.jit(md.init, static_argnums=0)(0)
  with pytest.raises(finetune.InitFromMismatch) as e:
    finetune.load_pretrained(c, md, p, s)
  msg = str(e.value)
  assert "params/blocks/0/attn/qkv/kernel: source (32, 96) vs model (48, 144)" in msg
  assert "params/blocks/1/attn/qkv/kernel: missing from" in msg and "mismatched key(s)" in msg


def test_init_from_checkpoint_and_safetensors(folder, reference, tmp_path):
  from vit_jax_fix.interop import save_torch
  from vit_jax_fix.interop.position import resize_pos_embed
  # Our checkpoint (3 classes, 16 px = 2x2 grid) into a 5-class model at 32 px (4x4 grid).
  c = _config(folder)
  c.init_from.path = str(reference)
  md = state_lib.ModelDef.create(c.model.name, **dict(TINY, img_size=32, num_classes=5))
  fresh_p, fresh_s = jax.jit(md.init, static_argnums=0)(7)
  p, _ = finetune.load_pretrained(c, md, fresh_p, fresh_s)
  src = ckpt.load_state_dicts(str(reference))[2]
  p = md.per_block(p)
  np.testing.assert_array_equal(p["head"]["kernel"], fresh_p["head"]["kernel"])        # re-initialised
  np.testing.assert_array_equal(p["blocks"][0]["attn"]["qkv"]["kernel"], src["blocks"][0]["attn"]["qkv"]["kernel"])
  want = resize_pos_embed(src["pos_embed"], (4, 4), num_prefix=1)                        # torch-exact bicubic
  np.testing.assert_allclose(p["pos_embed"], want, rtol=1e-6, atol=1e-7)
  assert p["pos_embed"].shape == (1, 17, 32)

  # A .safetensors exported by interop, from the model of that checkpoint: every weight arrives unchanged.
  model = ckpt.load_model(str(reference))
  path = str(tmp_path / "m.safetensors")
  save_torch(model, path, name=c.model.name, overrides=dict(TINY, num_classes=3))
  c.init_from.path = path
  md3 = state_lib.ModelDef.create(c.model.name, **dict(TINY, num_classes=3))
  p3, s3 = jax.jit(md3.init, static_argnums=0)(7)
  got, _ = finetune.load_pretrained(c, md3, p3, s3)
  np.testing.assert_array_equal(_flat(md3.per_block(got)), _flat(src))


def test_nan_stops_with_step_metric_and_checkpoint(folder, tmp_path):
  wd = tmp_path / "nan"
  with pytest.raises(loop.NonFiniteLossError) as e:
    _train(_config(folder, debug_nan_at_step=5), wd)
  msg = str(e.value)
  assert "train/loss = nan at step 5" in msg, msg
  assert f"Last good checkpoint: step 4 at {wd / 'checkpoints' / '4'}" in msg
  assert "nonfinite_policy=skip" in msg
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]    # the NaN state is never saved


def test_nan_skip_policy_counts_and_continues(folder, tmp_path, capsys):
  wd = tmp_path / "skip"
  _train(_config(folder, debug_nan_at_step=3, nonfinite_policy="skip"), wd)
  assert "update skipped (1 skipped so far)" in capsys.readouterr().out
  rows = [json.loads(line) for line in open(wd / "metrics.jsonl")]
  skips = {r["step"]: r["train/nonfinite_skips"] for r in rows if "train/nonfinite_skips" in r}
  assert skips[2] == 0 and skips[3] == 1 and skips[6] == 1
  assert np.isfinite(_params(wd)).all()
  with pytest.raises(loop.NonFiniteLossError, match="more than nonfinite_max_skips=0"):
    _train(_config(folder, debug_nan_at_step=3, nonfinite_policy="skip", nonfinite_max_skips=0), tmp_path / "s2")


def test_bad_images_and_empty_class_folders_train(tmp_path, capsys):
  root = tmp_path / "odd"
  data_testing.make_image_folder(str(root), num_classes=2, per_class=3, size=(20, 20), odd_modes=True, corrupt=2)
  (root / "class_99_empty").mkdir()
  c = _config((str(root), str(tmp_path / "tfds")), total_steps=2, checkpoint_every_steps=2)
  with pytest.warns(UserWarning, match="skipped 2 unreadable"):
    final = _train(c, tmp_path / "w")
  assert "1 empty class folder(s) ['class_99_empty']" in capsys.readouterr().out
  assert final["eval/count"] == 16                         # 2 x (3 + 5 odd modes); corrupt files skipped


@pytest.mark.parametrize("change, expect", [
    ({"batch_size": 6}, "batch_size = 6 is not divisible by the 8 devices"),
    ({"eval_batch_size": 12}, "eval_batch_size = 12 is not divisible by the 8 devices"),
    ({"mesh.data": 3}, "--config.mesh.data=-1"),
    ({"mesh.fsdp": 3}, "set --config.mesh.fsdp to one of [1, 2, 4, 8]"),
    ({"model.name": "deit_small_patch16_shrink_base", "model.overrides": dict(TINY, keep_rate=1.5)},
     "keep_rate must be in (0, 1], got 1.5"),
    ({"model.overrides": dict(TINY, num_classes=2)}, "Fix: remove model.overrides.num_classes"),
    ({"data.num_classes": 2}, "leave data.num_classes unset"),
    ({"data.train_split": "training"}, "available splits are ['train']"),
])
def test_bad_config_fails_before_training(folder, tmp_path, change, expect):
  c = _config(folder, **{"mesh.data": -1, "batch_size": 16, "eval_batch_size": 16, **change})
  t = time.process_time()
  with pytest.raises(ValueError) as e:
    loop.train_and_evaluate(c, str(tmp_path / "w"))       # the 8 test devices, mesh from the config
  assert expect in str(e.value), str(e.value)
  assert not (tmp_path / "w").exists()                     # nothing written, nothing trained
  assert time.process_time() - t < 30


# ------------------------------------------------------------------------- a workdir in a bucket (issue #21)
# The run, its checkpoints, metrics, TensorBoard and collapse diagnostics, and the tools reading it, on a fake
# Google Cloud Storage (tests/fake_gcs.py) in which `open`, `os.*` or `shutil` on a bucket path fail.

BUCKET_RUN = "gs://bucket/runs/tiny"


@pytest.fixture(scope="module")
def bucket_run(folder, tmp_path_factory):
  """(fake bucket root, final eval): the reference run in the bucket, crashed after step 3 (checkpoint 2
  saved) and resumed; diagnostics at steps 0 and 6, two checkpoints kept."""
  root = tmp_path_factory.mktemp("gcs")
  extra = {"max_to_keep": 2, "diagnostics.every_steps": 6, "diagnostics.num_batches": 1,
           "diagnostics.batch_size": 2}
  with fake_gcs.fake_gcs(root):
    with pytest.raises(RuntimeError, match="debug_crash_at_step"):
      _train(_config(folder, debug_crash_at_step=3, **extra), BUCKET_RUN)
    final = _train(_config(folder, **extra), BUCKET_RUN)
  return root, final


def test_workdir_in_a_bucket_resumes_bit_identical(bucket_run, reference):
  root, final = bucket_run
  with fake_gcs.fake_gcs(root) as bucket:
    for ema in (False, True):
      np.testing.assert_array_equal(_params(BUCKET_RUN, ema), _params(reference, ema))
    assert sorted(p.name for p in ckpt.checkpoint_dir(BUCKET_RUN).iterdir()) == ["4", "6"]
    rows = metrics_lib.read_jsonl(f"{BUCKET_RUN}/metrics.jsonl")
    assert final["eval/top1"] == [r for r in rows if "eval/top1" in r][-1]["eval/top1"]
    # each save logged how long it held the step (issue #21): the crashed run's, then the resumed run's
    saves = [(r["step"], r["checkpoint/blocking_s"]) for r in rows if "checkpoint/blocking_s" in r]
    assert [s for s, _ in saves] == [2, 4, 6] and all(0 < t < 60 for _, t in saves)
    assert json.loads((paths.as_path(BUCKET_RUN) / "config.json").read_text())["total_steps"] == 6
    local = bucket.local(BUCKET_RUN)
    assert glob.glob(os.path.join(local, "tensorboard", "events.*"))
    assert {"step_0.json", "step_6.json", "hf_bands.png"} <= set(os.listdir(os.path.join(local, "diagnostics")))


def test_fake_bucket_catches_local_file_apis(tmp_path, monkeypatch):
  """What the trainer did before (os.makedirs(os.path.abspath(workdir))) fails on the fake bucket."""
  monkeypatch.chdir(tmp_path)
  with pytest.raises(AssertionError, match="local-only file APIs used on bucket paths"):
    with fake_gcs.fake_gcs(tmp_path / "gcs"):
      with pytest.raises(AssertionError, match="makedirs"):
        os.makedirs(os.path.join(os.path.abspath(BUCKET_RUN), "checkpoints"), exist_ok=True)


def test_tools_read_and_write_a_bucket(folder, bucket_run, monkeypatch, tmp_path):
  from vit_jax_fix import convert, diagnose
  from vit_jax_fix import evaluate as E
  root, final = bucket_run
  monkeypatch.chdir(tmp_path)
  with fake_gcs.fake_gcs(root) as bucket:
    # evaluate --checkpoint gs://... --out gs://...: the run's own final numbers
    res = E.run(_config(folder), checkpoint=BUCKET_RUN, out="gs://bucket/eval/out.json", mesh=_mesh())
    assert res["val"]["top1"] == final["eval/top1"]
    assert json.loads(paths.as_path("gs://bucket/eval/out.json").read_text())["val"]["top1"] == final["eval/top1"]
    # convert to-torch from the bucket into the bucket; from-torch into the bucket: the same weights
    exported = "gs://bucket/export/tiny.safetensors"
    assert convert.main(["to-torch", "--checkpoint", f"{BUCKET_RUN}/checkpoints/6", "--out", exported]) == 0
    assert convert.main(["from-torch", "--weights", bucket.local(exported), "--out", "gs://bucket/imported"]) == 0
    np.testing.assert_array_equal(_params("gs://bucket/imported"), _params(BUCKET_RUN))
    # diagnose --checkpoint gs://... --out gs://...
    diagnose.main(["--model", "deit_small_patch16_224", "--checkpoint", BUCKET_RUN, "--data", "random",
                   "--batch-size", "2", "--num-batches", "1", "--out", "gs://bucket/diag", "--no-progress"])
    assert {"diagnostics.json", "measures_vs_depth.png"} <= set(os.listdir(bucket.local("gs://bucket/diag")))


# ----------------------------------------------------------------------------- kills, SIGTERM, crash (main.py)

KILL_CONFIG = '''
import sys
sys.path.insert(0, {root!r})
from configs import deit_s

def get_config():
  c = deit_s.get_config()
  c.model.overrides = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.1)
  c.data.data_dir = {data_dir!r}
  c.data.image_size = 16
  c.data.shuffle_buffer = 64
  c.batch_size = 8
  c.eval_batch_size = 10
  c.total_steps = 14
  c.schedule.warmup_steps = 2
  c.ema.decay = 0.9
  c.mesh.data = 2
  c.log_every_steps = 1
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 2
  c.max_to_keep = 2
  c.progress_bar = False
  return c
'''


def _env(cache):
  return dict(os.environ, JAX_NUM_CPU_DEVICES="2", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
              JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
              PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run_until(cmd, env, workdir, step, sig):
  """Starts cmd, sends `sig` once metrics.jsonl reaches `step`; returns (returncode, stdout, stderr)."""
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 400
  while logged_step(workdir) < step:
    if proc.poll() is not None:
      out, err = proc.communicate()
      raise AssertionError(f"run ended before step {step}: rc {proc.returncode}\n{_tail(err)}")
    assert time.time() < deadline, "timed out waiting for the run"
    time.sleep(0.05)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


@pytest.mark.slow
def test_random_kills_sigterm_and_crash_resume_identical(tmp_path):
  data_dir = tmp_path / "tfds"
  cfg = tmp_path / "kill.py"
  cfg.write_text(KILL_CONFIG.format(root=ROOT, data_dir=str(data_dir)))
  env = _env(tmp_path.parent / "jax_cache_reliability")
  cmd = lambda wd, *extra: [sys.executable, RUNNER, str(data_dir), "--config", str(cfg), "--workdir", str(wd),
                            *extra]
  a, b = tmp_path / "a", tmp_path / "b"
  out = subprocess.run(cmd(a), env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, _tail(out.stderr)

  rng = random.Random(10)
  k1 = rng.randint(2, 5)
  k2 = rng.randint(k1 + 2, 8)                                 # both kills land anywhere, mid-save included
  slow = "--config.debug_step_sleep=0.25"
  for k in (k1, k2):
    rc, _, _ = _run_until(cmd(b, slow), env, b, k, signal.SIGKILL)
    assert rc == -signal.SIGKILL
  rc, stdout, err = _run_until(cmd(b, slow), env, b, k2 + 2, signal.SIGTERM)   # preemption
  assert rc == 0, _tail(err)
  assert "preempted: checkpoint saved at step" in stdout
  saved = int(stdout.split("preempted: checkpoint saved at step ")[1].split(";")[0])
  assert (b / "checkpoints" / str(saved)).exists()
  crash_at = saved + 1 + rng.randint(0, 1)                    # crash inside the step, between checkpoints
  out = subprocess.run(cmd(b, f"--config.debug_crash_at_step={crash_at}"), env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode != 0 and "injected crash" in out.stderr
  out = subprocess.run(cmd(b), env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, _tail(out.stderr)
  assert "final eval top-1" in out.stdout
  for ema in (False, True):
    np.testing.assert_array_equal(_params(a, ema), _params(b, ema))
