"""Regression pin of the whole default pipeline (its own file: the longest test, run by
one pytest worker while the other runs tests/test_search.py)."""

from __future__ import annotations

import json
import os

import pytest

from nemo_jax._src.run import search as run_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def front_summary(front):
  """The fields of a front pinned by the regression fixture (objectives to 6 decimals)."""
  return [{"w_bits": list(m["w_bits"]), "a_bits": list(m["a_bits"]), "keep": round(m["keep"], 6),
           "species": m["species"],
           "objectives": {k: round(v, 6) for k, v in sorted(m["objectives"].items())}}
          for m in front]


LEGACY_QUANTIZERS = {"weight_quant": "symmetric_per_channel", "activation_format": "int",
                     "placement": "conv_inputs"}


def test_default_search_front_is_pinned():
  # Regression pin of the whole pipeline (species protocol, NSGA-III priority, resizing,
  # archive): 3 generations of the default config. Regenerate the fixture only for an
  # intended change of results (see the commit that introduced it). The quantizer
  # settings are given explicitly, so later changes of the DEFAULTS keep this pin.
  result = run_lib.search(None, out_dir=None, generations=3, progress=False,
                          final_split=None, selection_per_class=0, **LEGACY_QUANTIZERS)
  with open(os.path.join(REPO, "tests", "data", "default_front_g3.json")) as f:
    expected = json.load(f)
  got = front_summary(result.front)
  assert [(m["species"], m["w_bits"], m["a_bits"], m["keep"]) for m in got] == [
      (m["species"], m["w_bits"], m["a_bits"], m["keep"]) for m in expected]
  for g, e in zip(got, expected):  # rounding can flip the 6th decimal on another machine
    assert g["objectives"] == pytest.approx(e["objectives"], abs=2e-6)
