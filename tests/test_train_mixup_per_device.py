"""Mixup / CutMix run per device inside the jitted step (each device mixes only its own shard)."""
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax_fix.train import sharding as S
from vit_jax_fix.train import steps


def test_each_device_mixes_only_its_own_shard_with_its_own_lambda():
  mesh = S.make_mesh(4, 2)                                         # 8 devices, 2 images each
  kw = dict(num_classes=16, mixup_alpha=0.8, cutmix_alpha=0.0, switch_prob=0.0, prob=1.0, label_smoothing=0.0)
  mix = jax.jit(steps.make_mixer(kw, mesh))
  values = np.arange(16, dtype=np.float32)
  images = np.broadcast_to(values[:, None, None, None], (16, 4, 4, 3)).copy()   # image i is constant i
  batch = S.global_batch({"image": images, "label": np.arange(16, dtype=np.int32)}, mesh)
  mixed, targets = mix(jax.random.key(0), batch["image"], batch["label"])
  mixed, targets = np.asarray(mixed)[:, 0, 0, 0], np.asarray(targets)
  lambdas = []
  for d in range(8):
    a, b = 2 * d, 2 * d + 1
    # Mixing partners come from the same device: every mixed value lies between its shard's two images,
    # and the targets put all mass on that shard's two labels.
    assert np.all((mixed[[a, b]] >= a - 1e-5) & (mixed[[a, b]] <= b + 1e-5))
    np.testing.assert_allclose(targets[[a, b]][:, [a, b]].sum(axis=1), 1.0, rtol=1e-6)
    lambdas.append(targets[a, a])
  assert len(set(np.round(lambdas, 6))) > 1                       # devices draw their own lambda
  whole = jax.jit(steps.make_mixer(kw))(jax.random.key(0), jnp.asarray(images), jnp.arange(16))
  assert np.asarray(whole[1])[0, 15] > 0                           # the global form pairs image 0 with 15
