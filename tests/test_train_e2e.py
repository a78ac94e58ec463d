"""End to end: main.py on mocked imagenet2012 over an 8-device CPU mesh (4 data x 2 fsdp): train, evaluate,
checkpoint, `kill -9`, resume, finish -- the final parameters equal an uninterrupted run's bit for bit; a
finished workdir does not train again; ImageNet not prepared fails at once with a clear message."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vit_jax_fix.train import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "train_runner.py")

TINY_CONFIG = '''
import sys
sys.path.insert(0, {root!r})
from configs import deit_s

def get_config():
  c = deit_s.get_config()
  c.model.overrides = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.1)
  c.data.data_dir = {data_dir!r}
  c.data.image_size = 16
  c.data.shuffle_buffer = 64
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_steps = 8
  c.schedule.warmup_steps = 2
  c.ema.evaluate = True
  c.ema.decay = 0.9
  c.mesh.data = 4
  c.mesh.fsdp = 2
  c.sharding.strategy = "fsdp"
  c.sharding.fsdp_min_size = 64
  c.log_every_steps = 1
  c.eval_every_steps = 4
  c.checkpoint_every_steps = 2
  c.progress_bar = False
  return c
'''

# Trainings in subprocesses with async Orbax saves: keep them on one xdist worker (never concurrent).
pytestmark = pytest.mark.xdist_group("training")


def _env(tmp_path):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path.parent / "jax_cache_train_e2e"),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return env


def _tail(stderr: str, n: int = 3000) -> str:
  """The end of a subprocess's stderr without the interpreter-shutdown noise of Orbax's async writer."""
  lines = [ln for ln in stderr.splitlines() if "shutting down" not in ln and "Exception ignored" not in ln
           and not ln.startswith("  File ") and not ln.startswith("Traceback")]
  return "\n".join(lines)[-n:]


def _cmd(data_dir, cfg, workdir, *extra):
  return [sys.executable, RUNNER, str(data_dir), "--config", str(cfg), "--workdir", str(workdir), *extra]


@pytest.mark.slow
def test_train_kill_resume_bit_identical(tmp_path):
  data_dir = tmp_path / "tfds"
  cfg = tmp_path / "tiny.py"
  cfg.write_text(TINY_CONFIG.format(root=ROOT, data_dir=str(data_dir)))
  env = _env(tmp_path)

  # 1. Uninterrupted run.
  a = tmp_path / "a"
  out = subprocess.run(_cmd(data_dir, cfg, a), env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, _tail(out.stderr)
  assert "final eval top-1" in out.stdout
  rows = [json.loads(line) for line in open(a / "metrics.jsonl")]
  assert any("train/loss" in r and r["step"] == 8 for r in rows)
  evals = [r for r in rows if "eval/top1" in r]
  assert [r["step"] for r in evals] == [4, 8]
  assert all(r["eval/count"] == 20 and r["eval_ema/count"] == 20 for r in evals)   # every example once
  assert (a / "config.json").exists() and (a / "tensorboard").is_dir()

  # 2. A run killed with SIGKILL after its step-4 checkpoint, then restarted.
  b = tmp_path / "b"
  proc = subprocess.Popen(_cmd(data_dir, cfg, b, "--config.debug_step_sleep=1.0"), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not (b / "checkpoints" / "4").exists():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.2)
  proc.kill()   # SIGKILL: no handler, no final save
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (b / "checkpoints" / "8").exists()
  out = subprocess.run(_cmd(data_dir, cfg, b), env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, _tail(out.stderr)
  assert "final eval top-1" in out.stdout

  for ema in (False, True):
    _, _, pa, sa = ckpt.load_state_dicts(str(a), ema=ema)
    _, _, pb, sb = ckpt.load_state_dicts(str(b), ema=ema)
    np.testing.assert_array_equal(_flat(pa), _flat(pb))
    np.testing.assert_array_equal(_flat(sa) if _leaves(sa) else 0, _flat(sb) if _leaves(sb) else 0)
  # 3. A finished workdir is not trained again.
  n_rows = len(open(a / "metrics.jsonl").readlines())
  out = subprocess.run(_cmd(data_dir, cfg, a), env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, _tail(out.stderr)
  assert "already finished" in out.stdout
  assert len(open(a / "metrics.jsonl").readlines()) == n_rows


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def _flat(tree):
  return np.concatenate([np.ravel(v) for v in _leaves(tree)])


def test_imagenet_not_prepared_fails_fast(tmp_path):
  env = _env(tmp_path)
  env["JAX_NUM_CPU_DEVICES"] = "1"
  t = time.time()
  out = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config",
                        os.path.join(ROOT, "configs", "augvit_s.py"), "--workdir", str(tmp_path / "w"),
                        f"--config.data.data_dir={tmp_path / 'empty'}"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode != 0
  err = out.stderr[-4000:]
  assert "imagenet2012" in err and str(tmp_path / "empty") in err, err
  assert "manual" in err.lower(), err
  assert time.time() - t < 120
