"""Cost models against hand-computed values and an independent EMOMC transcription."""

from __future__ import annotations

import math

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemo_jax._src import costs
from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.layers import QConv, QDense
from nemo_jax._src.workload import extract_workload


def batch(w, a, keep):
  return QuantConfig(w_bits=np.asarray(w, np.int32), a_bits=np.asarray(a, np.int32),
                     keep=np.asarray(keep, np.float32))


def random_configs(rng, num, layers, lo=2, hi=8, float_prob=0.05):
  w = rng.integers(lo, hi + 1, (num, layers))
  a = rng.integers(lo, hi + 1, (num, layers))
  w[rng.random(w.shape) < float_prob] = 32
  a[rng.random(a.shape) < float_prob] = 32
  keep = np.round(rng.uniform(0.2, 1.0, num), 2)
  return batch(w, a, keep)


# ---------------------------------------------------------------------------------
# Two-layer net, every number by hand.


class TwoLayer(nn.Module):
  @nn.compact
  def __call__(self, x, ctx=None, train=False):
    x = QConv(4, 3)(x, ctx)            # 4x4x3 -> 4x4x4, no bias
    return QDense(2)(jnp.mean(x, axis=(1, 2)), ctx)   # 4 -> 2, with bias


def test_two_layer_hand_computed():
  wl = extract_workload(TwoLayer(), (4, 4, 3), 2)
  # conv: 3*3*3*4 = 108 weights, 108 * 16 = 1728 MACs; dense: 8 weights + 2 biases, 8 MACs
  assert wl.weights.tolist() == [108, 8] and wl.macs.tolist() == [1728, 8]
  assert wl.total_params == 118
  cfg = batch([[4, 8]], [[8, 2]], [0.5])
  out = {k: float(v[0]) for k, v in costs.compute_costs(wl, cfg).items()}
  fp32_bops = (1728 + 8) * 32 * 32
  bops = 1728 * 4 * 8 + 8 * 8 * 2
  assert out["bops"] == pytest.approx(bops, rel=1e-6)
  assert out["bops_ratio"] == pytest.approx(bops / fp32_bops, rel=1e-6)
  assert out["macs"] == 1736 and out["params"] == 118
  assert out["weight_bits"] == pytest.approx(108 * 4 + 8 * 8)
  assert out["model_ratio"] == pytest.approx((108 * 4 + 8 * 8 + 2 * 32) / (32 * 118), rel=1e-6)
  assert out["act_peak_bits"] == pytest.approx(max(4 * 4 * 3 * 8, 4 * 2))
  assert out["act_total_bits"] == pytest.approx(4 * 4 * 3 * 8 + 4 * 2)
  assert out["size_kb_normal"] == pytest.approx((108 * 4 + 8 * 8) / 8192, rel=1e-6)
  assert out["size_kb_csr"] == pytest.approx((108 * 7 + 8 * 11) * 0.5 / 8192, rel=1e-6)
  # COO: round(4 + log2 108 = 10.75) = 11; round(8 + log2 8) = 11
  assert out["size_kb_coo"] == pytest.approx((108 * 11 + 8 * 11) * 0.5 / 8192, rel=1e-6)
  # X|Y conv counts: [1728, 1728, 1728/16, 1728/(9*3), 0]; linear: [8, 8, 8, 2, 0]
  conv = (0.102 * 1728 * 0.5 * 5 + 0.728 * 108 * 5 / 16 + 0.728 * 1728 * 0.5
          + 0.447 * 64)
  dense = 0.102 * 8 * 0.5 * 9 + 0.728 * 8 * 9 / 16 + 0.728 * 8 * 0.5 + 0.447 * 2
  assert out["energy_XY"] == pytest.approx((conv + dense) / 1e6, rel=1e-6)
  # X|Fx, k = 3, s(3) = 1 - 0.5^3 = 0.875: ifmap 1728/3, weights 1728/4, ofmap/psum 1728/3
  conv = (0.102 * 1728 * 0.5 * 5 + 0.728 * 432 * 5 / 16 + 0.728 * 576 * 0.875
          + 0.447 * 576 * 0.875 + 0.728 * 576 * 0.875)
  assert out["energy_XFx"] == pytest.approx((conv + dense) / 1e6, rel=1e-6)


# ---------------------------------------------------------------------------------
# EMOMC on VGG-16 (CIFAR): an independent, literal transcription of the paper's formulas.

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"]


def vgg16_layers():
  """Hand-written layer list of EMOMC's CIFAR VGG-16 at 32x32."""
  layers, cin, hw = [], 3, 32
  for v in VGG16:
    if v == "M":
      hw //= 2
      continue
    layers.append(dict(kind="conv", k=3, cin=cin, cout=v, groups=1, O=hw * hw,
                       N=3 * 3 * cin * v))
    cin = v
  layers.append(dict(kind="linear", cin=512, cout=10, N=5120))
  return layers


def emomc_energy_reference(layers, bits, p, dataflow):
  total = 0.0
  s = lambda n: 1 - (1 - p) ** n
  for layer, b in zip(layers, bits):
    if layer["kind"] == "linear":
      M = layer["cin"] * layer["cout"]
      total += 0.102 * M * p * (round(b) + 1)
      total += 0.728 * M * (round(b) + 1) / 16
      total += 0.728 * M * p + 0.447 * layer["cout"]
      continue
    k, O, g = layer["k"], layer["O"], layer["groups"]
    ci, co = layer["cin"] / g, layer["cout"] / g
    M = k * k * O * ci * co * g
    if dataflow == "X|Y":
      mac, ifr, wr, ofw, psr = M, M, M / O, M / (k * k * ci), 0
    elif dataflow == "IC|OC":
      mac, ifr, wr, ofw, psr = M, M / co, M, M / ci, M / ci
    elif dataflow == "Fx|Fy":
      mac, ifr, wr, ofw, psr = M, M, M / O, M / (k * k), M / (k * k)
    elif dataflow == "X|Fx":
      mac, ifr, wr, ofw, psr = M, M / k, M / math.sqrt(O), M / k, M / k
    e_mac = 0.102 * mac * p * (round(b) + 1)
    e_w = 0.728 * wr * (round(b) + 1) / 16
    if dataflow == "X|Y":
      e_if, e_of, e_ps = 0.728 * ifr * p, 0.447 * ofw, 0.728 * psr
    elif dataflow == "IC|OC":
      e_if = 0.728 * ifr * (s(co) if co <= 24 else 1)
      e_of = 0.447 * ofw * (s(ci) if ci <= 24 else 1)
      e_ps = 0.728 * psr * (s(ci) if ci <= 24 else 1)
    elif dataflow == "Fx|Fy":
      e_if, e_of, e_ps = 0.728 * ifr * p, 0.447 * ofw * s(k * k), 0.728 * psr * s(k * k)
    else:
      e_if, e_of, e_ps = 0.728 * ifr * s(k), 0.447 * ofw * s(k), 0.728 * psr * s(k)
    total += e_mac + e_w + e_if + e_of + e_ps
  return total / 1e6


def emomc_size_reference(layers, bits, p, coding):
  total = 0.0
  for layer, b in zip(layers, bits):
    N = layer["N"]
    if coding == "normal":
      total += N * round(b)
    elif coding == "csr":
      total += N * round(b + 3) * p
    else:
      total += N * round(b + math.log2(N)) * p
  return total / (1024 * 8)


def test_vgg16_matches_hand_written_layers():
  wl = extract_workload("vgg16_cifar", (32, 32, 3), 10)
  ref = vgg16_layers()
  assert wl.weights.tolist() == [layer["N"] for layer in ref]
  assert [int(o) for o in wl.out_h * wl.out_w][:-1] == [layer["O"] for layer in ref[:-1]]
  # EMOMC: FP32 VGG-16 is ~59 MB
  fp = costs.compute_costs(wl, QuantConfig.uniform(wl.num_layers))
  assert float(fp["size_kb_normal"]) * 1024 == pytest.approx(59e6, rel=0.01)


def test_emomc_formulas_vgg16_against_transcription():
  wl = extract_workload("vgg16_cifar", (32, 32, 3), 10)
  layers = vgg16_layers()
  rng = np.random.default_rng(0)
  num = 12
  w = rng.integers(2, 13, (num, wl.num_layers))         # EMOMC range 2..12
  w[0] = 32                                              # float baseline
  keep = np.round(rng.uniform(0.2, 0.8, num), 2)
  keep[1] = 1.0
  cfg = batch(w, np.full_like(w, 16), keep)
  out = costs.compute_costs(wl, cfg)
  for m in range(num):
    single = QuantConfig(w_bits=w[m], a_bits=np.full(wl.num_layers, 16), keep=keep[m])
    report = costs.cost_report(wl, single)
    for d, key in [("X|Y", "energy_XY"), ("IC|OC", "energy_ICOC"), ("Fx|Fy", "energy_FxFy"),
                   ("X|Fx", "energy_XFx")]:
      want = emomc_energy_reference(layers, w[m].tolist(), float(keep[m]), d)
      assert report["energy"][d] == pytest.approx(want, rel=1e-12), d
      assert float(out[key][m]) == pytest.approx(want, rel=5e-6), d
    for c in costs.CODINGS:
      want = emomc_size_reference(layers, w[m].tolist(), float(keep[m]), c)
      assert report["size_kb"][c] == pytest.approx(want, rel=1e-12), c
      assert float(out[f"size_kb_{c}"][m]) == pytest.approx(want, rel=5e-6), c


def test_emomc_grouped_and_depthwise_convs():
  """Depthwise (mobilenet) and grouped (resnext) layers use ci = in/g, co = out/g."""
  for name in ("mobilenet_v2", "resnext101_32x8d"):
    wl = extract_workload(name)
    layers = [dict(kind="linear", cin=int(wl.in_channels[i]), cout=int(wl.out_channels[i]),
                   N=int(wl.weights[i])) if wl.ops[i] == "dense" else
              dict(kind="conv", k=int(wl.kernel_w[i]), cin=int(wl.in_channels[i]),
                   cout=int(wl.out_channels[i]), groups=int(wl.groups[i]),
                   O=int(wl.out_h[i] * wl.out_w[i]), N=int(wl.weights[i]))
              for i in range(wl.num_layers)]
    rng = np.random.default_rng(1)
    bits = rng.integers(2, 13, wl.num_layers)
    p = 0.37
    report = costs.cost_report(wl, QuantConfig(bits, bits, p))
    out = costs.compute_costs(wl, batch(bits[None], bits[None], [p]))
    for d in costs.DATAFLOWS:
      want = emomc_energy_reference(layers, bits.tolist(), p, d)
      assert report["energy"][d] == pytest.approx(want, rel=1e-12)
      assert float(costs.emomc_energy(wl, batch(bits[None], bits[None], [p]), d)[0]) == \
          pytest.approx(want, rel=5e-6)
    for c in costs.CODINGS:
      want = emomc_size_reference(layers, bits.tolist(), p, c)
      assert float(out[f"size_kb_{c}"][0]) == pytest.approx(want, rel=5e-6)


# ---------------------------------------------------------------------------------
# Zoo-level identities and precision.


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50", "resnext101_32x8d"])
def test_bops_identities(name):
  wl = extract_workload(name)
  L = wl.num_layers
  cfg = batch([[32] * L, [8] * L, [4] * L], [[32] * L, [8] * L, [8] * L], [1.0, 1.0, 0.5])
  out = costs.compute_costs(wl, cfg)
  fp32 = float(wl.macs.sum()) * 1024
  assert float(out["bops"][0]) == pytest.approx(fp32, rel=1e-6)
  assert float(out["bops"][1]) == pytest.approx(fp32 / 16, rel=1e-6)
  assert float(out["bops_ratio"][1]) == pytest.approx(1 / 16, rel=1e-6)
  assert float(out["bops_ratio"][2]) == pytest.approx(1 / 32, rel=1e-6)
  assert float(out["sparse_bops"][2]) == pytest.approx(fp32 / 64, rel=1e-6)
  assert float(out["model_ratio"][0]) == pytest.approx(1.0, rel=1e-6)
  assert float(out["weight_ratio"][1]) == pytest.approx(0.25, rel=1e-6)
  other = wl.total_params - wl.weights.sum()
  assert float(out["model_ratio"][1]) == pytest.approx(
      (8 * wl.weights.sum() + 32 * other) / (32 * wl.total_params), rel=1e-6)


def test_large_values_accurate():
  """float32 BOPs/sizes of ResNeXt-101 (~1e13) within 2e-6 of exact integer sums."""
  wl = extract_workload("resnext101_32x8d")
  rng = np.random.default_rng(2)
  cfg = random_configs(rng, 64, wl.num_layers)
  out = costs.compute_costs(wl, cfg)
  w = np.asarray(cfg.w_bits).astype(object)
  a = np.asarray(cfg.a_bits).astype(object)
  macs = wl.macs.astype(object)
  exact_bops = np.asarray([int(np.sum(macs * w[m] * a[m])) for m in range(64)], np.float64)
  exact_wbits = np.asarray([int(np.sum(wl.weights.astype(object) * w[m])) for m in range(64)],
                           np.float64)
  np.testing.assert_allclose(np.asarray(out["bops"], np.float64), exact_bops, rtol=2e-6)
  np.testing.assert_allclose(np.asarray(out["weight_bits"], np.float64), exact_wbits,
                             rtol=2e-6)


def _loop_reference(wl, cfg):
  """Per-config float64 loop (cost_report / layer_costs_numpy), same keys as the batch."""
  keys = {"bops": "bops", "weight_bits": "weight_bits", "size_kb_normal": "size_kb_normal",
          "size_kb_csr": "size_kb_csr", "size_kb_coo": "size_kb_coo"}
  rows = []
  for m in range(np.shape(cfg.w_bits)[0]):
    w, a, p = np.asarray(cfg.w_bits)[m], np.asarray(cfg.a_bits)[m], float(cfg.keep[m])
    per = costs.layer_costs_numpy(wl, w, a, p)
    row = {k: per[v].sum() for k, v in keys.items()}
    row.update({k: per[k].sum() for k in ("energy_XY", "energy_ICOC", "energy_FxFy",
                                          "energy_XFx")})
    row["act_peak_bits"] = per["act_bits"].max()
    row["act_total_bits"] = per["act_bits"].sum()
    report = costs.cost_report(wl, QuantConfig(w, a, p))
    row["bops_ratio"] = report["bops_ratio"]
    row["model_ratio"] = report["model_ratio"]
    row["sparse_bops"] = p * row["bops"]
    rows.append(row)
  return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


@hypothesis.settings(deadline=None, max_examples=15)
@hypothesis.given(st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_vectorized_equals_loop_resnet20(seed, num):
  wl = extract_workload("resnet20")
  cfg = random_configs(np.random.default_rng(seed), num, wl.num_layers, lo=1, hi=32,
                       float_prob=0.1)
  out = costs.compute_costs(wl, cfg)
  ref = _loop_reference(wl, cfg)
  for k, v in ref.items():
    np.testing.assert_allclose(np.asarray(out[k], np.float64), v, rtol=5e-6, err_msg=k)


def test_vectorized_equals_loop_resnet50_and_in_user_jit():
  wl = extract_workload("resnet50")
  cfg = random_configs(np.random.default_rng(3), 16, wl.num_layers)
  out = costs.compute_costs(wl, cfg)
  ref = _loop_reference(wl, cfg)
  for k, v in ref.items():
    np.testing.assert_allclose(np.asarray(out[k], np.float64), v, rtol=5e-6, err_msg=k)
  # Inside a caller's jit (tracers: validation skipped) and through the registry.
  names = ("model_ratio", "bops_ratio", "energy:X|Y", "size_kb:coo")
  objs = jax.jit(lambda c: costs.compute_objectives(wl, c, names))(cfg)
  want = np.stack([ref["model_ratio"], ref["bops_ratio"], ref["energy_XY"],
                   ref["size_kb_coo"]], axis=1)
  np.testing.assert_allclose(np.asarray(objs, np.float64), want, rtol=5e-6)
  # One member without the batch axis.
  one = costs.compute_costs(wl, QuantConfig(cfg.w_bits[0], cfg.a_bits[0], cfg.keep[0]))
  assert float(one["bops"]) == pytest.approx(float(out["bops"][0]), rel=1e-6)


def test_cost_report_json_keys():
  wl = extract_workload("resnet20")
  rep = costs.cost_report(wl, QuantConfig.uniform(wl.num_layers, 8, 8, 0.5))
  assert set(rep) == {"params", "macs", "bops", "bops_ratio", "model_ratio", "size_kb",
                      "energy", "layers"}
  assert set(rep["size_kb"]) == {"normal", "csr", "coo"}
  assert set(rep["energy"]) == {"X|Y", "IC|OC", "Fx|Fy", "X|Fx"}
  assert len(rep["layers"]) == wl.num_layers
  assert sum(layer["bops"] for layer in rep["layers"]) == rep["bops"]
  assert rep["bops_ratio"] == pytest.approx(1 / 16)
  assert sum(layer["energy"]["X|Y"] for layer in rep["layers"]) == \
      pytest.approx(rep["energy"]["X|Y"])


def test_register_custom_cost():
  wl = extract_workload("resnet20")
  lut = np.random.default_rng(4).uniform(0, 1, (wl.num_layers, 33)).astype(np.float32)

  def latency(workload, configs):  # a per-layer latency lookup table by weight bits
    return jnp.take_along_axis(jnp.asarray(lut)[None], configs.w_bits[..., None],
                               axis=-1)[..., 0].sum(-1)

  default = costs.CostRegistry.default()
  registry = default.with_cost("test:latency", latency)
  # Registries are values: the default one is unchanged.
  assert "test:latency" in registry and "test:latency" not in default
  with pytest.raises(ValueError, match="already registered"):
    registry.with_cost("test:latency", latency)
  with pytest.raises(ValueError, match="built-in"):
    default.with_cost("bops_ratio", latency)
  cfg = random_configs(np.random.default_rng(5), 7, wl.num_layers)
  got = costs.compute_objectives(wl, cfg, ["test:latency", "bops_ratio"], registry)
  w = np.asarray(cfg.w_bits)
  want = lut[np.arange(wl.num_layers)[None], w].sum(-1)
  np.testing.assert_allclose(np.asarray(got[:, 0]), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got[:, 1]),
                             np.asarray(costs.compute_costs(wl, cfg)["bops_ratio"]), rtol=1e-6)
  with pytest.raises(ValueError, match="test:latency"):
    costs.compute_objectives(wl, cfg, ["test:latency"])


def test_bad_input():
  wl = extract_workload("resnet20")
  L = wl.num_layers
  good = np.full((2, L), 8)
  with pytest.raises(ValueError, match=r"w_bits.*22 bit-widths"):
    costs.compute_costs(wl, batch(good[:, :-1], good, [1, 1]))
  with pytest.raises(ValueError, match=r"a_bits.*allowed: integers 1\.\.32"):
    bad = good.copy()
    bad[1, 3] = 33
    costs.compute_costs(wl, batch(good, bad, [1, 1]))
  with pytest.raises(ValueError, match=r"w_bits.*0.*allowed"):
    bad = good.copy()
    bad[0, 0] = 0
    costs.compute_costs(wl, batch(bad, good, [1, 1]))
  for keep in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match=r"keep.*\(0, 1\]"):
      costs.compute_costs(wl, batch(good, good, [keep, 1.0]))
  with pytest.raises(ValueError, match=r"keep.*\(0, 1\]"):
    costs.cost_report(wl, QuantConfig(good[0], good[0], 0.0))
  with pytest.raises(ValueError, match="w_bits"):
    costs.cost_report(wl, QuantConfig(good[0, :3], good[0], 1.0))
  with pytest.raises(ValueError, match=r"dataflow.*'X\|Y'"):
    costs.check_dataflow("XY")
  with pytest.raises(ValueError, match=r"coding.*'csr'"):
    costs.emomc_size_kb(wl, batch(good, good, [1, 1]), "huffman")
  assert costs.check_coding("CSR") == "csr"
  with pytest.raises(ValueError, match=r"objectives.*'bops_ratio'"):
    costs.compute_objectives(wl, batch(good, good, [1, 1]), ["latency"])


def test_chunked_equals_single_block():
  wl = extract_workload("resnet20")
  cfg = random_configs(np.random.default_rng(6), 23, wl.num_layers)
  whole = costs.compute_costs(wl, cfg, chunk_size=None)
  for chunk in (1, 5, 23, 100):
    part = costs.compute_costs(wl, cfg, chunk_size=chunk)
    for k in costs.COST_KEYS:
      np.testing.assert_allclose(np.asarray(part[k]), np.asarray(whole[k]), rtol=1e-6,
                                 err_msg=f"{k} chunk={chunk}")
  objs = costs.compute_objectives(wl, cfg, ["bops_ratio", "model_ratio"], chunk_size=4)
  np.testing.assert_allclose(np.asarray(objs[:, 0]), np.asarray(whole["bops_ratio"]),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="chunk_size"):
    costs.compute_costs(wl, cfg, chunk_size=0)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_nncf_bops_use_the_bits_of_the_tensor_each_layer_reads(name):
  wl = extract_workload(name, placement="nncf")
  rng = np.random.default_rng(7)
  P = 6
  w = rng.integers(2, 9, (P, wl.num_layers))
  a = rng.integers(2, 9, (P, wl.num_act_quantizers))
  keep = np.round(rng.uniform(0.3, 1.0, P), 2)
  out = costs.compute_costs(wl, batch(w, a, keep))
  # Explicit loops over layers and over activation quantizers (float64).
  readers = {q: [] for q in range(wl.num_act_quantizers)}
  for i, q in enumerate(wl.input_quantizer):
    readers[int(q)].append(i)
  for m in range(P):
    bops = sum(float(wl.macs[i]) * w[m, i] * a[m, q] for q, ls in readers.items() for i in ls)
    assert float(out["bops"][m]) == pytest.approx(bops, rel=2e-6)
    assert float(out["bops_ratio"][m]) == pytest.approx(bops / (1024 * wl.total_macs), rel=2e-6)
    total = sum(float(wl.act_elems[q]) * a[m, q] for q in range(wl.num_act_quantizers))
    assert float(out["act_total_bits"][m]) == pytest.approx(total, rel=2e-6)
    assert float(out["act_peak_bits"][m]) == pytest.approx(
        max(float(wl.act_elems[q]) * a[m, q] for q in range(wl.num_act_quantizers)), rel=1e-6)
  # A residual quantizer changes no BOPs (no layer reads it), only activation traffic.
  site = wl.act_kinds.index("residual")
  a2 = a.copy()
  a2[:, site] = 32
  out2 = costs.compute_costs(wl, batch(w, a2, keep))
  np.testing.assert_array_equal(np.asarray(out2["bops"]), np.asarray(out["bops"]))
  assert np.all(np.asarray(out2["act_total_bits"]) > np.asarray(out["act_total_bits"]))
  with pytest.raises(ValueError, match=f"a_bits.*{wl.num_act_quantizers} bit-widths"):
    costs.compute_costs(wl, batch(w, w, keep))
