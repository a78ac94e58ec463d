"""DeiT distillation: the distilled models (distillation token, `head_dist`), checked against the official
listings and timm's `deit_*_distilled_patch16_224`; DeiT's `DistillationLoss`; the teacher in the train step."""
import numpy as np
import pytest
from flax import nnx

import vit_jax_fix
from vit_jax_fix.interop import from_torch_state_dict, testing, to_torch_state_dict, torch_keys
from vit_jax_fix.interop.timm_models import create_timm_model, default_layout
from vit_jax_fix.interop.torch_compat import import_timm
from vit_jax_fix.models.registry import count_params, get_spec
from tests.test_models import reference_listing

timm = import_timm()
import torch  # noqa: E402  (after import_timm, which prepares torchvision)

# Parameter counts of the official DistilledVisionTransformer (reference: DeiT models.py, derived).
OFFICIAL_PARAMS = {"tiny": 5_910_800, "small": 22_436_432, "base": 87_338_192}
TINY = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=4, depth=2, num_classes=10)


@pytest.mark.parametrize("size", sorted(OFFICIAL_PARAMS))
def test_distilled_counts_and_keys_equal_official(size):
  """The official listing of deit_<size>_patch16_224 plus what DistilledVisionTransformer adds: dist_token,
  head_dist, and a pos_embed slot for the second token."""
  name = f"deit_{size}_distilled_patch16_224"
  model = nnx.eval_shape(lambda: vit_jax_fix.create_model(name))
  assert count_params(model) == OFFICIAL_PARAMS[size]
  _, keys = reference_listing(f"deit_{size}_patch16_224")
  d = keys["cls_token"][-1]
  keys.update({"dist_token": (1, 1, d), "pos_embed": (1, 14 * 14 + 2, d), "head_dist.weight": (1000, d),
               "head_dist.bias": (1000,)})
  assert torch_keys(model) == keys
  assert get_spec(name).weights.sha256 in get_spec(name).weights.url


def test_distilled_full_size_keys_equal_timm():
  name = "deit_small_distilled_patch16_224"
  tmodel = create_timm_model(name)
  model = nnx.eval_shape(lambda: vit_jax_fix.create_model(name))
  assert default_layout(name) == "timm"
  assert torch_keys(model, layout="timm") == {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}


def _images(seed=1):
  x = np.random.default_rng(seed).normal(size=(3, 32, 32, 3)).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def test_distilled_timm_parity_both_modes():
  """Export to timm (strict load): the same averaged logits in eval and the same two heads in training
  (timm after set_distilled_training(True)); then timm's random weights imported give the same logits."""
  name = "deit_small_distilled_patch16_224"
  model = testing.random_model(name, **TINY)
  tmodel = create_timm_model(name, **TINY)
  tmodel.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                          to_torch_state_dict(model, layout="timm").items()}, strict=True)
  x, xt = _images()
  tmodel.eval()
  with torch.no_grad():
    ref = tmodel(xt).numpy()
  np.testing.assert_allclose(testing.logits(model, x), ref, atol=1e-4, rtol=0)
  # Training mode: the two heads separately (drop rates are 0, so training mode is deterministic).
  tmodel.train()
  tmodel.set_distilled_training(True)
  with torch.no_grad():
    ref_cls, ref_dist = (t.numpy() for t in tmodel(xt))
  assert np.abs(ref_cls - ref_dist).max() > 0.1, "the two heads must differ for this test to mean anything"
  model.train()
  import jax
  with jax.default_matmul_precision("highest"):
    got_cls, got_dist = model(jax.numpy.asarray(x))
  np.testing.assert_allclose(np.asarray(got_cls), ref_cls, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got_dist), ref_dist, atol=1e-4, rtol=0)
  # timm -> ours
  with torch.no_grad():
    for p in tmodel.parameters():
      p.add_(0.2 * torch.randn_like(p))
  back = from_torch_state_dict(testing.random_model(name, seed=3, **TINY), tmodel.state_dict(), layout="timm")
  tmodel.eval()
  with torch.no_grad():
    np.testing.assert_allclose(testing.logits(back, x), tmodel(xt).numpy(), atol=1e-4, rtol=0)
