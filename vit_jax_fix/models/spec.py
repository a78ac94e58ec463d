"""The table of registered model names: what one entry holds (`ModelSpec`, `Weights`) and how to add one.

This module is the bottom of the model registry and imports no model: `zoo.py` fills the table with every
family's official names (`register`, `register_weights`), and `registry.py` (which imports the zoo) looks
names up and builds models. A family module (vit.py, shunted.py) only defines its model.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


# Hosts whose links open a web page (sign-in, virus-scan or captcha interstitials), not the file itself.
BROWSER_HOSTS = ("drive.google.com", "docs.google.com", "pan.baidu.com")


@dataclasses.dataclass(frozen=True)
class Weights:
  """Released weights of one registered name (one row of the weights table in `zoo.py`)."""
  url: str                          # as the authors publish it (README, or code: see `source`)
  file_name: str                    # name in the cache and in a mirror (for browser links: save it so)
  layout: str = "official"          # torch key layout, as `interop.checkpoint_io.load_torch(layout=...)`
  sha256: str = ""                  # full hex digest, or the prefix a torch.hub file name carries ('-a1311bcf')
  source: str = ""                  # where the URL is published
  note: str = ""                    # what a user must know (keep rate, pickled args, dead link, ...)

  @property
  def needs_browser(self) -> bool:
    """Google Drive / Baidu links cannot be fetched by a script: the file is downloaded by hand."""
    from urllib.parse import urlparse
    return urlparse(self.url).hostname in BROWSER_HOSTS


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  family: str                       # key-map family for interop: deit, deit3, cait, augvit, deepvit, ao, evit, shunted
  builder: Callable                 # the model class (its keyword arguments are the valid overrides)
  kwargs: dict
  mean: tuple = IMAGENET_MEAN
  std: tuple = IMAGENET_STD
  crop_pct: float = 0.875
  interpolation: str = "bicubic"
  paper_top1: float | None = None   # ImageNet-1k top-1 reported by the authors (see README for sources)
  source: str = ""                  # official repository :: constructor
  weights: Weights | None = None    # the authors' released weights, if any (table at the end of zoo.py)

  def preprocessing(self) -> dict:
    return dict(mean=self.mean, std=self.std, crop_pct=self.crop_pct, interpolation=self.interpolation)


# name -> spec; filled by zoo.py when `registry` is first imported.
SPECS: dict[str, ModelSpec] = {}


def register(name: str, family: str, builder: Callable, kwargs: dict, **spec_fields) -> None:
  if name in SPECS:
    raise ValueError(f"model {name!r} is registered twice")
  SPECS[name] = ModelSpec(name, family, builder, dict(kwargs), **spec_fields)


def register_weights(name: str, weights: Weights) -> None:
  """Attach the released weights of a registered name (the weights table at the end of `zoo.py`)."""
  if name not in SPECS:
    raise KeyError(f"weights for {name!r}: no such registered model")
  if weights.layout not in ("official", "timm"):
    raise ValueError(f"weights for {name!r}: layout must be 'official' or 'timm', got {weights.layout!r}")
  SPECS[name] = dataclasses.replace(SPECS[name], weights=weights)
