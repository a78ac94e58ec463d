"""DeepViT's BatchNorm re-calibration (official `bn_calibration`, an option of the trainer before evaluation).

Re-calibrated on exactly the batch it is then evaluated on, eval mode (running statistics) must give the
same logits as batch statistics: the stem BatchNorms and the re-attention BatchNorm over heads all hold that
batch's statistics. Over several batches the statistics are their plain (cumulative) average.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax_fix.train import evaluate as eval_lib
from vit_jax_fix.train import sharding as shard_lib
from vit_jax_fix.train import state as state_lib

TINY = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=5, stem="cnn",
            reattention=True, scale_adjustment=0.5)


def test_recalibrated_statistics_are_those_of_the_calibration_batches():
  model_def = state_lib.ModelDef.create("deepvit_S", **TINY)
  params, stats = jax.jit(model_def.init, static_argnums=0)(0)
  mesh = shard_lib.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
  calib = jax.jit(eval_lib.make_calibration_step(model_def))
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32), "mask": np.ones(4, np.float32)}
             for _ in range(3)]

  one = eval_lib.recalibrate_batch_norm(calib, params, stats, batches[:1], mesh, num_batches=1)
  x = jnp.asarray(batches[0]["image"])
  running = model_def.model(params, one, train=False)(x)
  batch_stat_model = model_def.model(params, stats, train=False)
  for _, node in nnx.iter_graph(batch_stat_model):
    if isinstance(node, nnx.BatchNorm):
      node.use_running_average = False
  np.testing.assert_allclose(running, batch_stat_model(x), rtol=1e-4, atol=1e-5)
  assert not np.allclose(model_def.model(params, stats, train=False)(x), running, atol=1e-3)

  three = eval_lib.recalibrate_batch_norm(calib, params, stats, batches, mesh, num_batches=3)
  each = [eval_lib.recalibrate_batch_norm(calib, params, stats, [b], mesh, num_batches=1) for b in batches]
  jax.tree.map(lambda avg, *s: np.testing.assert_allclose(avg, np.mean(s, axis=0), rtol=1e-5, atol=1e-6),
               three, *each)
