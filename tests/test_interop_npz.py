"""Google ViT npz import (vit_jax / big_vision names, loop / scanned, prefixes, pos-embed resizing) and the
position-embedding resizer against torch's F.interpolate."""
import numpy as np
import pytest

from vit_jax_fix.interop import to_torch_state_dict
from vit_jax_fix.interop.npz import load_npz, to_npz_dict
from vit_jax_fix.interop.position import resize_pos_embed
from vit_jax_fix.interop.testing import logits, random_model
from vit_jax_fix.interop.torch_compat import import_timm

import_timm()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

NAME = "deit_tiny_patch16_224"
KW = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=10)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("grids", [((4, 4), (8, 8)), ((14, 14), (24, 24)), ((24, 24), (14, 14)), ((7, 7), (5, 9))])
def test_resize_matches_torch_interpolate(method, antialias, grids):
  (h, w), (nh, nw) = grids
  pos = np.random.default_rng(0).normal(size=(1, 1 + h * w, 8)).astype(np.float32)
  got = resize_pos_embed(pos, (nh, nw), num_prefix=1, old_grid=(h, w), method=method, antialias=antialias)
  grid = torch.from_numpy(pos[0, 1:].reshape(h, w, 8)).permute(2, 0, 1)[None]
  ref = F.interpolate(grid, size=(nh, nw), mode=method, align_corners=False, antialias=antialias)
  ref = ref[0].permute(1, 2, 0).reshape(1, nh * nw, 8).numpy()
  np.testing.assert_array_equal(got[:, :1], pos[:, :1])  # the class slot is kept as is
  np.testing.assert_allclose(got[:, 1:], ref, atol=1e-5, rtol=0)


def test_resize_rejects_non_square_without_grid():
  with pytest.raises(ValueError, match="old_grid"):
    resize_pos_embed(np.zeros((1, 1 + 12, 4)), (4, 4))


def test_npz_names_follow_the_google_layout():
  """Spot-check the documented transposes on the exporter, independently of the importer."""
  model = random_model(NAME, **KW)
  sd = to_torch_state_dict(model)
  npz = to_npz_dict(model, style="vit_jax")
  assert npz["embedding/kernel"].shape == (4, 4, 3, 64)
  q = npz["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"]
  assert q.shape == (64, 4, 16)
  np.testing.assert_array_equal(q.reshape(64, 64), sd["blocks.1.attn.qkv.weight"][:64].T)
  v_bias = npz["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/value/bias"]
  np.testing.assert_array_equal(v_bias.reshape(-1), sd["blocks.1.attn.qkv.bias"][128:])
  out = npz["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"]
  assert out.shape == (4, 16, 64)
  np.testing.assert_array_equal(out.transpose(2, 0, 1).reshape(64, 64), sd["blocks.0.attn.proj.weight"])
  assert "Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel" in npz
  assert npz["Transformer/posembed_input/pos_embedding"].shape == (1, 65, 64)
  bv = to_npz_dict(model, style="big_vision", scanned=True, prefix="params/")
  assert bv["params/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"].shape == (2, 64, 4, 16)
  assert bv["params/pos_embedding"].shape == (1, 64, 64) and "params/Transformer/encoderblock/LayerNorm_1/scale" in bv


@pytest.mark.parametrize("style,scanned,prefix", [("vit_jax", False, ""), ("vit_jax", False, "opt/target/"),
                                                  ("big_vision", True, "params/"), ("big_vision", False, "")])
def test_npz_round_trip_same_logits(style, scanned, prefix, tmp_path):
  model = random_model(NAME, **KW)
  path = tmp_path / "vit.npz"
  np.savez(path, **to_npz_dict(model, style=style, scanned=scanned, prefix=prefix))
  back, info = load_npz(str(path), NAME, {k: v for k, v in KW.items() if k != "num_classes"})
  assert info["style"] == style and info["scanned"] == scanned and info["overrides"]["num_classes"] == 10
  x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(logits(back, x), logits(model, x), atol=1e-5, rtol=0)


def test_npz_into_patches_only_model_folds_class_slot():
  """vit_jax pos_embed has a class slot; a DeiT III-style model (no slot) gets it folded into cls: same logits."""
  model = random_model(NAME, **KW)
  back, _ = load_npz(to_npz_dict(model), NAME, dict(KW, pos_embed="patches"))
  x = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(logits(back, x), logits(model, x), atol=1e-5, rtol=0)


def test_npz_grid_resize_and_head_reset():
  model = random_model(NAME, **KW)  # 8x8 grid
  npz = to_npz_dict(model, style="big_vision")
  big, _ = load_npz(npz, NAME, dict(KW, img_size=48, num_classes=5), head_mode="reset")  # 12x12 grid
  pos = np.asarray(big.pos_embed[...])
  ref = resize_pos_embed(npz["pos_embedding"], (12, 12), num_prefix=0, method="bilinear")
  assert pos.shape == (1, 145, 64)
  np.testing.assert_array_equal(pos[:, 0], 0)  # big_vision has no class slot: zero slot
  np.testing.assert_allclose(pos[:, 1:], ref, atol=1e-6)
  head = np.asarray(big.head.kernel[...])
  assert head.shape == (64, 5) and 0.005 < head.std() < 0.05 and not np.asarray(big.head.bias[...]).any()
  with pytest.raises(Exception, match="head"):
    load_npz(npz, NAME, dict(KW, num_classes=5))  # head shape mismatch without head_mode='reset'


def test_npz_errors():
  model = random_model(NAME, **KW)
  npz = to_npz_dict(model)
  with pytest.raises(ValueError, match="patch size"):
    load_npz(npz, NAME, dict(KW, patch_size=8))
  with pytest.raises(ValueError, match="pre_logits"):
    load_npz({**npz, "pre_logits/kernel": np.zeros((64, 64))}, NAME, KW)
  with pytest.raises(Exception, match=r"missing keys \(12\)"):
    load_npz(npz, NAME, dict(KW, depth=3))
