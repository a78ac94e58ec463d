"""Two processes on localhost (jax.distributed, CPU collectives), 2 CPU devices each, train through main.py on
mocked imagenet2012 over a 2 x 2 ('data', 'fsdp') mesh: each process reads its own shard of the data, both
finish, and the shared workdir holds one checkpoint and one metrics file (with the periodic collapse
diagnostics measured on the weights gathered from both processes)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from tests.test_train_e2e import ROOT, RUNNER, TINY_CONFIG

# Trainings in subprocesses with async Orbax saves: keep them on one xdist worker (never concurrent).
pytestmark = pytest.mark.xdist_group("training")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes(tmp_path):
  cfg = tmp_path / "tiny.py"
  cfg.write_text(TINY_CONFIG.format(root=ROOT, data_dir="DATA_DIR_FROM_FLAG")
                 .replace("c.mesh.data = 4", "c.mesh.data = 2").replace("c.total_steps = 8", "c.total_steps = 4"))
  workdir = tmp_path / "w"
  port = _free_port()
  procs = []
  for i in range(2):
    data_dir = tmp_path / f"tfds{i}"   # one metadata dir per process: no write race
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path.parent / "jax_cache_train_mp"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs.append(subprocess.Popen(
        [sys.executable, RUNNER, str(data_dir), "--config", str(cfg), "--workdir", str(workdir),
         f"--config.data.data_dir={data_dir}", "--config.diagnostics.every_steps=2",
         "--config.diagnostics.batch_size=2", "--config.diagnostics.num_batches=1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True))
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=600))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "final eval top-1" in outs[0][0]
  assert (workdir / "checkpoints" / "4").exists()
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  ev = [r for r in rows if "eval/top1" in r]
  assert len(ev) == 1 and ev[0]["eval/count"] == 20 and ev[0]["step"] == 4
  # periodic diagnostics on FSDP weights gathered across the two processes; process 0 logs them
  diag = [r["step"] for r in rows if "collapse/feature_diversity/block_02" in r]
  assert diag == [0, 2, 4]
  assert sorted(os.listdir(workdir / "diagnostics"))[:3] == ["attn_similarity.png", "hf_bands.png",
                                                             "measures_vs_depth.png"]
