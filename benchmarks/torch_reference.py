"""Compact PyTorch reference models for the families whose official repositories are not installable here.

Written from the papers' math and the official code's behaviour (not copied from the official code; the
repositories and commits are in tests/data/golden/README.md). They follow the *official* formulation,
including its cost, so that the speed comparison is against what the official code executes:

- attention is the timm-0.3/0.4-era explicit form (q k^T, softmax, A v), as in the AugViT, DeepViT,
  Anti-oversmoothing and EViT repositories (they all need or expose the map);
- AugViT `Circulant_Linear` gathers the dense (D, D) matrix W = weight_list[index_matrix] on every call;
- FeatScale is the token mean (DC) / remainder (HC) form with the ViT code's double add;
- AttnScale materialises A_hat = A_LP + (1 + lamb)(A - A_LP);
- DeepViT re-attention is Conv2d(H, H, 1) + BatchNorm2d over heads after the softmax;
- EViT keeps the top-k class-attention tokens (sorted, from the residual stream after the attention
  residual) and fuses the rest into one token, weights not renormalised, appended last.

A second section, `RefShunted` (`shunted_reference_for`), is the Shunted Transformer (shunted.md), checked
against the golden `shunted` case in tests/test_reference_parity.py.

The state_dict keys are the official keys (what `to_torch_state_dict(model, layout='official')` writes), so
`load_state_dict(strict=True)` checks the architecture. `RefViT()` with no option is the official (2020) DeiT
code with explicit attention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CirculantLinear(nn.Module):
  """Official AugViT form: dense weight gathered from `weight_list` by the persistent `index_matrix`."""

  def __init__(self, din: int, dout: int, num_cir: int = 4):
    super().__init__()
    m = min(din, dout)
    b = m // num_cir
    k_in, k_out = din // b, dout // b
    self.weight_list = nn.Parameter(torch.zeros(k_out * k_in * b))
    self.bias = nn.Parameter(torch.zeros(dout))
    r = torch.arange(b)[:, None]
    c = torch.arange(b)[None, :]
    pattern = (r - c) % b
    offsets = (torch.arange(k_out)[:, None] * k_in + torch.arange(k_in)[None, :]) * b
    full = offsets[:, :, None, None] + pattern[None, None]
    self.register_buffer("index_matrix", full.permute(0, 2, 1, 3).reshape(dout, din).long())

  def forward(self, x):
    return F.linear(x, self.weight_list[self.index_matrix], self.bias)


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
  def __init__(self, dim, num_heads, attn_scale=False, reattention=False):
    super().__init__()
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.scale = self.head_dim ** -0.5
    if attn_scale:
      self.lamb = nn.Parameter(torch.zeros(num_heads))
    else:
      self.lamb = None
    self.reattention = reattention
    if reattention:
      self.reatten_matrix = nn.Conv2d(num_heads, num_heads, 1)
      self.var_norm = nn.BatchNorm2d(num_heads)
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                                   # (B, H, N, Dh)
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    a = attn
    if self.reattention:
      a = self.var_norm(self.reatten_matrix(a))
    if self.lamb is not None:
      lam = self.lamb[None, :, None, None]
      a = (1 + lam) * a - lam / n                                       # A_LP + (1 + lamb)(A - A_LP)
    out = (a @ v).transpose(1, 2).reshape(b, n, d)
    return self.proj(out), attn


class Block(nn.Module):
  def __init__(self, dim, num_heads, mlp_ratio=4.0, *, attn_scale=False, reattention=False, feat_scale=False,
               aug_circulant2=False, num_cir=4, keep_rate=1.0, fuse_token=True):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads, attn_scale=attn_scale, reattention=reattention)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.feat_scale = feat_scale
    if feat_scale:
      self.lamb1 = nn.Parameter(torch.zeros(dim))
      self.lamb2 = nn.Parameter(torch.zeros(dim))
    self.aug = aug_circulant2
    if aug_circulant2:
      mk = lambda: nn.Sequential(CirculantLinear(dim, dim, num_cir), nn.GELU())
      self.augs_attn, self.augs, self.augs_attn2, self.augs2 = mk(), mk(), mk(), mk()
    self.keep_rate = keep_rate
    self.fuse_token = fuse_token
    self.selection = None   # (idx, scores) of the last reorganisation, None when it was skipped (for tests)

  def _reorganize(self, x, attn):
    n = x.shape[1]
    k = math.ceil(self.keep_rate * (n - 1))
    self.selection = None
    if k >= n - 1:
      return x
    scores = attn[:, :, 0, 1:].mean(dim=1)                              # (B, N - 1)
    _, idx = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    self.selection = (idx, scores)
    others = x[:, 1:]
    kept = torch.gather(others, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    parts = [x[:, :1], kept]
    if self.fuse_token:
      dropped = torch.ones_like(scores).scatter(1, idx, 0.0)
      parts.append(torch.einsum("bn,bnd->bd", scores * dropped, others).unsqueeze(1))
    return torch.cat(parts, dim=1)

  def forward(self, x):
    u = self.norm1(x)
    a, attn = self.attn(u)
    if self.feat_scale:
      dc = a.mean(dim=1, keepdim=True)
      hc = a - dc
      a = a + self.lamb1 * dc + self.lamb2 * hc
      a = a + self.lamb1 * dc + self.lamb2 * hc          # the official ViT code adds the term twice
    x = x + a
    if self.aug:
      x = (x + self.augs_attn(u) + self.augs_attn2(u)) * 3.0 / 4
    if self.keep_rate < 1.0:
      x = self._reorganize(x, attn)
    v = self.norm2(x)
    x = x + self.mlp(v)
    if self.aug:
      x = (x + self.augs(v) + self.augs2(v)) * 3.0 / 4
    return x


class RefViT(nn.Module):
  """DeiT backbone (cls token, pos_embed with the cls slot, head on token 0) with per-block options.
  `img_size` is an int (square) or (H, W); tokens follow the row-major (h, w) order of the patch grid."""

  def __init__(self, *, img_size=224, patch_size=16, num_classes=1000, embed_dim=384, depth=12, num_heads=6,
               mlp_ratio=4.0, keep_rates=None, **block_kwargs):
    super().__init__()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
    ih, iw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)   # (H, W); int = square
    n = (ih // patch_size) * (iw // patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
    keep_rates = keep_rates or [1.0] * depth
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, keep_rate=keep_rates[i], **block_kwargs)
                                 for i in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.head = nn.Linear(embed_dim, num_classes)

  def forward(self, images):
    x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    for blk in self.blocks:
      x = blk(x)
    return self.head(self.norm(x)[:, 0])


def reference_for(name: str, **overrides) -> nn.Module:
  """The reference model of a registered name of the augvit / deepvit / ao / evit / shunted families (or
  plain DeiT-S with explicit attention for 'deit_small_patch16_224')."""
  if name.startswith("shunted"):
    return shunted_reference_for(name, **overrides)
  from vit_jax_fix.interop.timm_models import full_kwargs
  kw = full_kwargs(name, **overrides)
  base = dict(img_size=kw["img_size"], patch_size=kw["patch_size"], num_classes=kw["num_classes"],
              embed_dim=kw["embed_dim"], depth=kw["depth"], num_heads=kw["num_heads"], mlp_ratio=kw["mlp_ratio"])
  if kw.get("stem", "patch") != "patch" or float(kw.get("scale_adjustment", 1.0)) != 1.0:
    raise NotImplementedError(f"{name}: the CNN stem / scale adjustment are not in the reference module")
  opts = {}
  if kw.get("aug_shortcut"):
    if kw["aug_shortcut"] != "circulant2":
      raise NotImplementedError(f"{name}: only aug_shortcut='circulant2' is in the reference module")
    opts.update(aug_circulant2=True, num_cir=kw["num_cir"])
  for key in ("attn_scale", "reattention"):
    v = kw.get(key)
    if v:
      if v is not True:
        raise NotImplementedError(f"{name}: per-block {key} is not in the reference module")
      opts[key] = True
  if kw.get("reattention_scale"):
    raise NotImplementedError(f"{name}: reattention_scale is not in the reference module")
  if kw.get("feat_scale"):
    if kw["feat_scale"] != "double":
      raise NotImplementedError(f"{name}: only the ViT FeatScale (double add) is in the reference module")
    opts["feat_scale"] = True
  kr = kw.get("keep_rate", 1.0)
  if isinstance(kr, (list, tuple)) or float(kr) < 1.0:
    blocks = kw.get("keep_rate_blocks")
    if blocks is not None:
      chosen = {i % kw["depth"] for i in blocks}
      base["keep_rates"] = [float(kr) if i in chosen else 1.0 for i in range(kw["depth"])]
    else:
      base["keep_rates"] = [float(r) for r in kr] if isinstance(kr, (list, tuple)) else [float(kr)] * kw["depth"]
    opts["fuse_token"] = bool(kw.get("fuse_token", False))
  return RefViT(**base, **opts)


# ----------------------------------------------------------------------------------------------------------
# Shunted Transformer (OliverRensu/Shunted-Transformer @ 6861101 SSA.py; arXiv 2111.15193).
#
# Official module and key names (`patch_embed1.conv.<i>`, `block<s>.<j>.attn.sr1`, `mlp.dwconv.dwconv`, ...),
# NCHW input. PyTorch convolutions pad symmetrically (7x7/2 pad 3, 3x3/2 pad 1); the reduction convs
# (r x r / r) and the stem's 2x2/2 conv have no padding, so their outputs are floor(H / r) wide. LayerNorm
# eps: 1e-6 for the block and stage norms (`norm_eps`), PyTorch's default 1e-5 for the patch-embedding norms
# and the reduction-path norms `attn.norm1/norm2`.
# ----------------------------------------------------------------------------------------------------------


def _tokens(fmap):
  """(B, C, H, W) -> (B, H*W, C), row-major (h, w) token order."""
  return fmap.flatten(2).transpose(1, 2)


def _fmap(tokens, h, w):
  """(B, H*W, C) -> (B, C, H, W)."""
  return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


class ShuntedStem(nn.Module):
  """`patch_embed1` (the official `Head`): conv 7x7/2 (no bias) -> BN -> ReLU, num_conv x [conv 3x3 -> BN ->
  ReLU], conv 2x2/2 (bias), then LayerNorm(eps 1e-5) over tokens. The stem is 64 channels wide."""

  def __init__(self, num_conv, dim, in_chans=3, width=64):
    super().__init__()
    seq = [nn.Conv2d(in_chans, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    for _ in range(num_conv):
      seq += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    seq.append(nn.Conv2d(width, dim, 2, 2))
    self.conv = nn.Sequential(*seq)
    self.norm = nn.LayerNorm(dim, eps=1e-5)

  def forward(self, x):
    y = self.conv(x)
    return self.norm(_tokens(y)), y.shape[2], y.shape[3]


class ShuntedPatchEmbed(nn.Module):
  """Stages 2+ (`OverlapPatchEmbed`): conv 3x3/2 pad 1 (bias) -> tokens -> LayerNorm(eps 1e-5)."""

  def __init__(self, din, dim):
    super().__init__()
    self.proj = nn.Conv2d(din, dim, 3, 2, 1)
    self.norm = nn.LayerNorm(dim, eps=1e-5)

  def forward(self, x):
    y = self.proj(x)
    return self.norm(_tokens(y)), y.shape[2], y.shape[3]


class ShuntedDWConv(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

  def forward(self, x, h, w):
    return _tokens(self.dwconv(_fmap(x, h, w)))


class ShuntedMlp(nn.Module):
  """Detail-specific FFN: fc1 -> GELU(y + DWConv3x3(y)) -> fc2."""

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.dwconv = ShuntedDWConv(hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x, h, w):
    y = self.fc1(x)
    return self.fc2(self.act(y + self.dwconv(y, h, w)))


class ShuntedAttention(nn.Module):
  """Shunted self-attention (shunted.md section 3), with explicit softmax(q k^T * scale) v.

  r > 1: q's heads split in halves; the first half attends to K/V aggregated by an r x r / r conv, the second
  by an (r/2) x (r/2) / (r/2) conv (each: conv -> LN(1e-5) -> GELU -> kv Linear(C, C) split as (k|v, head, d));
  V of each group gets a depthwise 3x3 conv of itself (as a C/2-channel map at that group's resolution)
  before the product. r = 1: plain MHSA, kv Linear(C, 2C), and the depthwise 3x3 of V is added after the
  product."""

  def __init__(self, dim, num_heads, sr_ratio, qkv_bias=True, qk_scale=None):
    super().__init__()
    self.num_heads, self.head_dim, self.sr_ratio = num_heads, dim // num_heads, sr_ratio
    self.scale = qk_scale or self.head_dim ** -0.5
    self.q = nn.Linear(dim, dim, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)
    self.act = nn.GELU()
    if sr_ratio > 1:
      self.sr1 = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
      self.norm1 = nn.LayerNorm(dim, eps=1e-5)
      self.sr2 = nn.Conv2d(dim, dim, sr_ratio // 2, sr_ratio // 2)
      self.norm2 = nn.LayerNorm(dim, eps=1e-5)
      self.kv1 = nn.Linear(dim, dim, bias=qkv_bias)
      self.kv2 = nn.Linear(dim, dim, bias=qkv_bias)
      self.local_conv1 = nn.Conv2d(dim // 2, dim // 2, 3, 1, 1, groups=dim // 2)
      self.local_conv2 = nn.Conv2d(dim // 2, dim // 2, 3, 1, 1, groups=dim // 2)
    else:
      self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
      self.local_conv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

  def _heads(self, t, heads):
    """(B, M, heads*d) -> (B, heads, M, d)."""
    return t.reshape(t.shape[0], t.shape[1], heads, self.head_dim).transpose(1, 2)

  def _merge(self, t):
    """(B, heads, M, d) -> (B, M, heads*d)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)

  def _attend(self, q, k, v):
    a = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    return a @ v

  def forward(self, x, h, w):
    b, n, c = x.shape
    q = self._heads(self.q(x), self.num_heads)
    if self.sr_ratio == 1:
      k, v = self.kv(x).chunk(2, dim=-1)                             # (k | v) halves of the 2C outputs
      out = self._attend(q, self._heads(k, self.num_heads), self._heads(v, self.num_heads))
      out = self._merge(out) + _tokens(self.local_conv(_fmap(v, h, w)))
      return self.proj(out)
    g = self.num_heads // 2
    xmap = _fmap(x, h, w)
    outs = []
    for qg, sr, norm, kv, local in ((q[:, :g], self.sr1, self.norm1, self.kv1, self.local_conv1),
                                    (q[:, g:], self.sr2, self.norm2, self.kv2, self.local_conv2)):
      red = sr(xmap)                                                 # (B, C, floor(H/s), floor(W/s))
      hr, wr = red.shape[2], red.shape[3]
      k, v = kv(self.act(norm(_tokens(red)))).chunk(2, dim=-1)       # (B, M, C/2) each, channels (head, d)
      v = v + _tokens(local(_fmap(v, hr, wr)))
      outs.append(self._merge(self._attend(qg, self._heads(k, g), self._heads(v, g))))
    return self.proj(torch.cat(outs, dim=-1))


class ShuntedBlock(nn.Module):
  def __init__(self, dim, num_heads, sr_ratio, mlp_ratio, qkv_bias=True, qk_scale=None, norm_eps=1e-6):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
    self.attn = ShuntedAttention(dim, num_heads, sr_ratio, qkv_bias, qk_scale)
    self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
    self.mlp = ShuntedMlp(dim, int(dim * mlp_ratio))

  def forward(self, x, h, w):
    x = x + self.attn(self.norm1(x), h, w)
    return x + self.mlp(self.norm2(x), h, w)


class RefShunted(nn.Module):
  """Shunted Transformer: per stage, patch embedding -> blocks -> stage norm (-> map for the next stage);
  logits = head(mean over tokens of the last stage norm). No position embeddings; any input size works."""

  def __init__(self, *, num_classes=1000, embed_dims=(64, 128, 256, 512), depths=(1, 2, 4, 1),
               num_heads=(2, 4, 8, 16), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), num_conv=0,
               qkv_bias=True, qk_scale=None, norm_eps=1e-6, in_chans=3):
    super().__init__()
    self.num_stages = len(depths)
    for i in range(self.num_stages):
      embed = ShuntedStem(num_conv, embed_dims[0], in_chans) if i == 0 else \
          ShuntedPatchEmbed(embed_dims[i - 1], embed_dims[i])
      setattr(self, f"patch_embed{i + 1}", embed)
      setattr(self, f"block{i + 1}", nn.ModuleList([
          ShuntedBlock(embed_dims[i], num_heads[i], sr_ratios[i], mlp_ratios[i], qkv_bias, qk_scale, norm_eps)
          for _ in range(depths[i])]))
      setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=norm_eps))
    self.head = nn.Linear(embed_dims[-1], num_classes)

  def forward(self, images):
    x = images
    for i in range(self.num_stages):
      x, h, w = getattr(self, f"patch_embed{i + 1}")(x)
      for blk in getattr(self, f"block{i + 1}"):
        x = blk(x, h, w)
      x = getattr(self, f"norm{i + 1}")(x)
      if i < self.num_stages - 1:
        x = _fmap(x, h, w)
    return self.head(x.mean(dim=1))


def shunted_reference_for(name: str, **overrides) -> RefShunted:
  """The reference Shunted module of a registered name ('shunted_t' / '_s' / '_b') with our overrides."""
  from vit_jax_fix.interop.timm_models import full_kwargs
  kw = full_kwargs(name, **overrides)
  return RefShunted(**{k: kw[k] for k in ("num_classes", "embed_dims", "depths", "num_heads", "mlp_ratios",
                                          "sr_ratios", "num_conv", "qkv_bias", "qk_scale", "norm_eps",
                                          "in_chans")})
