"""Mixup / CutMix (pure JAX): targets, convex combinations, CutMix boxes, DeiT III binarised targets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_fix.data import mixup as M

B, H, W, C, K = 6, 16, 12, 3, 10
_mix = M.mixup_cutmix  # jitted inside; hyper-parameters are traced, so it compiles once per shape


def _batch(seed=0):
  rng = np.random.RandomState(seed)
  return (jnp.asarray(rng.randn(B, H, W, C), jnp.float32),
          jnp.asarray(rng.permutation(K)[:B], jnp.int32))


def _run(seed, **kw):
  images, labels = _batch()
  args = dict(num_classes=K, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0, label_smoothing=0.1)
  args.update(kw)
  out, t = _mix(jax.random.key(seed), images, labels, **args)
  return images, labels, np.asarray(out), np.asarray(t)


@pytest.mark.parametrize("seed", range(6))
def test_targets_sum_to_one_and_carry_both_labels(seed):
  _, labels, _, t = _run(seed)
  np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-5)
  off = 0.1 / K
  lam = t[np.arange(B), labels] - off  # lam * (1 - smoothing) ... recovered below
  partner = np.asarray(labels)[::-1]
  both = t[np.arange(B), labels] + t[np.arange(B), partner] - 2 * off
  np.testing.assert_allclose(both, 0.9, atol=1e-5)  # the two mixed classes share the 'on' mass
  assert np.all(lam >= -1e-6)


def test_mixup_is_the_stated_convex_combination():
  images, labels, out, t = _run(1, cutmix_alpha=0.0)
  lam = (t[0, labels[0]] - 0.1 / K) / 0.9  # one-hot share of the own label
  assert 0.0 <= lam <= 1.0
  expected = lam * np.asarray(images) + (1 - lam) * np.asarray(images)[::-1]
  np.testing.assert_allclose(out, expected, atol=1e-5)
  # one lambda per batch (timm batch mode)
  lams = (t[np.arange(B), labels] - 0.1 / K) / 0.9
  np.testing.assert_allclose(lams, lam, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_pastes_one_box_and_corrects_lambda(seed):
  images, labels, out, t = _run(seed, mixup_alpha=0.0, label_smoothing=0.0)
  x, xf = np.asarray(images), np.asarray(images)[::-1]
  from_flip = np.all(out == xf, axis=-1) & ~np.all(out == x, axis=-1)  # [B, H, W]
  kept = np.all(out == x, axis=-1)
  assert np.all(from_flip | kept)
  mask = from_flip[0]
  assert np.all(from_flip == mask[None])  # same box in every image
  if mask.any():  # it is a rectangle
    ys, xs = np.nonzero(mask)
    assert mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
  lam = 1.0 - mask.mean()
  np.testing.assert_allclose(t[np.arange(B), labels], lam, atol=1e-5)


def test_switch_prob_and_prob_choose_the_method():
  images, labels = _batch()
  x = np.asarray(images)
  exact = []
  for s in range(40):  # same shapes as the other tests: reuses the compiled function
    out, _ = _mix(jax.random.key(s), images, labels, num_classes=K, mixup_alpha=0.8, cutmix_alpha=1.0,
                  switch_prob=0.5, prob=1.0, label_smoothing=0.0)
    exact.append(np.all((np.asarray(out) == x) | (np.asarray(out) == x[::-1])))
  exact = np.asarray(exact)
  assert 5 < exact.sum() < 35  # both CutMix (exact copies) and Mixup (blends) occur
  out, t = _mix(jax.random.key(0), images, labels, num_classes=K, mixup_alpha=0.8, cutmix_alpha=1.0,
                          switch_prob=0.5, prob=0.0, label_smoothing=0.1)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(images))
  np.testing.assert_allclose(np.asarray(t), np.asarray(M.smooth_one_hot(labels, K, 0.1)), atol=1e-6)


def test_bce_targets_are_binarised_mixed_labels():
  images, labels, _, t = _run(3, label_smoothing=0.0, bce_targets=True)
  assert set(np.unique(t)) <= {0.0, 1.0}
  partner = np.asarray(labels)[::-1]
  assert np.all(t[np.arange(B), labels] == 1.0)
  n_on = t.sum(-1)
  assert np.all((n_on == 1) | (n_on == 2))
  assert np.all(t[np.arange(B), partner][n_on == 2] == 1.0)
  with pytest.raises(ValueError, match="label_smoothing"):
    _mix(jax.random.key(0), images, labels, num_classes=K, label_smoothing=0.1, bce_targets=True)


def test_cutmix_box_area_tracks_lambda():
  keys = jax.random.split(jax.random.key(1), 200)
  y0, y1, x0, x1 = (np.asarray(v) for v in jax.vmap(lambda k: M.cutmix_box(k, jnp.float32(0.75), 64, 64))(keys))
  assert np.all((0 <= y0) & (y0 <= y1) & (y1 <= 64) & (0 <= x0) & (x0 <= x1) & (x1 <= 64))
  areas = (y1 - y0) * (x1 - x0) / 64 ** 2
  # uncropped boxes have side floor(64 * sqrt(0.25)) = 32 (area 0.25); clipping only shrinks them
  assert max(areas) == pytest.approx(0.25) and min(areas) < 0.25
