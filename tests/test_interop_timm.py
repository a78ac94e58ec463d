"""Parity with timm (the PyTorch anchor) for the families timm has: DeiT, DeiT III, CaiT.

Random JAX params (pushed away from init so LayerScale, biases and norms matter) -> export layout='timm' ->
timm `load_state_dict(strict=True)` -> same logits; and timm random init -> import -> same logits.
"""
import numpy as np
import pytest

from vit_jax_fix.interop import StateDictMismatch, testing, from_torch_state_dict, to_torch_state_dict
from vit_jax_fix.interop.timm_models import TimmUnsupported, create_timm_model, default_layout, timm_config
from vit_jax_fix.interop.torch_compat import import_timm

timm = import_timm()
import torch  # noqa: E402  (after import_timm, which prepares torchvision)

TINY = dict(img_size=32, embed_dim=64, num_heads=4, num_classes=10)
CASES = {
    "deit": ("deit_small_patch16_224", dict(TINY, patch_size=4, depth=2)),
    "deit_p8": ("deit_tiny_patch16_224", dict(TINY, patch_size=8, depth=3)),
    "deit3": ("deit_small_patch16_LS", dict(TINY, patch_size=4, depth=2)),
    "deit3_alias": ("deit3_small_patch16_224", dict(TINY, patch_size=8, depth=3)),
    "cait": ("cait_XXS24_224", dict(TINY, patch_size=4, depth=2, class_attn_depth=2)),
}


def images(n=3, seed=1):
  x = np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


jax_logits = testing.logits


def torch_logits(tmodel, xt):
  tmodel.eval()
  with torch.no_grad():
    return tmodel(xt).numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_to_timm_same_logits(case):
  name, kw = CASES[case]
  assert default_layout(name, **kw) == "timm"
  model = testing.random_model(name, **kw)
  sd = to_torch_state_dict(model, layout="timm")
  tmodel = create_timm_model(name, **kw)
  assert sorted(sd) == sorted(tmodel.state_dict()), "key sets differ"
  tmodel.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  x, xt = images()
  ref = torch_logits(tmodel, xt)
  got = jax_logits(model, x)
  assert np.abs(ref).max() > 0.5, "logits too small to test anything"
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_from_timm_same_logits(case):
  name, kw = CASES[case]
  torch.manual_seed(0)
  tmodel = create_timm_model(name, **kw)
  with torch.no_grad():  # timm inits LayerScale at 1e-5/1e-6 and biases at 0: perturb everything
    for p in tmodel.parameters():
      p.add_(0.2 * torch.randn_like(p))
  model = testing.random_model(name, seed=5, **kw)
  from_torch_state_dict(model, tmodel.state_dict(), layout="timm")
  x, xt = images(seed=2)
  np.testing.assert_allclose(jax_logits(model, x), torch_logits(tmodel, xt), atol=1e-4, rtol=0)


def test_deit3_timm_layout_renames_layer_scale():
  name, kw = CASES["deit3"]
  model = testing.random_model(name, **kw)
  timm_keys = set(to_torch_state_dict(model, layout="timm"))
  official_keys = set(to_torch_state_dict(model))
  assert "blocks.0.ls1.gamma" in timm_keys and "blocks.0.gamma_1" not in timm_keys
  assert "blocks.0.gamma_1" in official_keys
  # An official-layout dict given as timm layout is a mismatch that names the keys.
  with pytest.raises(StateDictMismatch, match=r"blocks\.0\.ls1\.gamma"):
    from_torch_state_dict(testing.random_model(name, **kw), to_torch_state_dict(model), layout="timm")


def test_timm_model_with_wrong_depth_is_a_listed_mismatch():
  name, kw = CASES["deit"]
  tmodel = create_timm_model(name, **dict(kw, depth=3))
  with pytest.raises(StateDictMismatch) as err:
    from_torch_state_dict(testing.random_model(name, **kw), tmodel.state_dict(), layout="timm")
  msg = str(err.value)
  assert "unexpected keys (12)" in msg and "blocks.2.attn.qkv.weight" in msg


def test_timm_wrong_name_is_a_listed_mismatch():
  # A CaiT state_dict into a DeiT: every talking-heads / class-attention key listed.
  tmodel = create_timm_model(*CASES["cait"][:1], **CASES["cait"][1])
  name, kw = CASES["deit"]
  with pytest.raises(StateDictMismatch) as err:
    from_torch_state_dict(testing.random_model(name, **kw), tmodel.state_dict(), layout="timm")
  msg = str(err.value)
  assert "blocks_token_only.0.attn.q.weight" in msg and "blocks.0.attn.proj_l.weight" in msg
  assert "pos_embed: checkpoint (1, 64, 64) vs model (1, 65, 64)" in msg


def test_models_timm_lacks_are_refused_with_reasons():
  assert default_layout("augvit_small") == "official"
  assert default_layout("attnscale_cait_S24_224") == "official"
  with pytest.raises(TimmUnsupported, match="attn_scale"):
    timm_config("attnscale_cait_XXS24_224")
  with pytest.raises(TimmUnsupported, match="talking_heads"):
    timm_config("deit_small_patch16_224", talking_heads=True)
  with pytest.raises(TimmUnsupported, match="per-block"):
    timm_config("deit_small_patch16_LS", layer_scale=[0.1, 0.2] * 6)
  name, kw = timm_config("deit_small_patch16_224", layer_scale=0.1)
  assert kw["init_values"] == 0.1 and not kw["no_embed_class"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_exported_file_loads_through_timm_pretrained_overlay(suffix, tmp_path):
  """What a PyTorch user does with our file: timm's own loader (pretrained_cfg_overlay=dict(file=...))."""
  from vit_jax_fix.interop.checkpoint_io import save_torch
  name, kw = CASES["deit3"]
  model = testing.random_model(name, **kw)
  path = str(tmp_path / ("m" + suffix))
  meta = save_torch(model, path, overrides=kw)
  tmodel = timm.create_model(meta["timm_model"], pretrained=True,
                             pretrained_cfg_overlay=dict(file=path, num_classes=meta["num_classes"]),
                             **meta["timm_kwargs"])
  x, xt = images(seed=4)
  np.testing.assert_allclose(jax_logits(model, x), torch_logits(tmodel, xt), atol=1e-4, rtol=0)
