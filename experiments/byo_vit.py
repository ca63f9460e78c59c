"""Bring your own Flax model: a small ViT, trained briefly, searched without edits.

The model is plain linen (a patch-embedding ``nn.Conv``, ``nn.MultiHeadDotProductAttention``
whose projections are ``nn.DenseGeneral``, ``nn.Dense`` MLPs, ``nn.LayerNorm``, a learned
position embedding and a class token). It is trained in float for a few epochs on the
embedded Fashion-MNIST subset with optax, then searched with the in-memory data:

    nemo_jax.search(config, model=vit, variables=variables, data={"train": ..., "test": ...})

Every conv / dense call is quantized by interception (``docs/DESIGN.md``, "Your own
model"): 1 patch conv + 6 per block (q, k, v, out, mlp1, mlp2) + the head.

Also usable as a factory for the command line (untrained weights):
``"model": "experiments/byo_vit.py:make_model"``.

    python experiments/byo_vit.py [--epochs 3] [--generations 4] [--out runs/byo_vit]

Measured (2 shared CPU cores, ``--epochs 3 --generations 3``, population 16): float
test top-1 0.7725 after 17 s of training; the 4-species search took 109 s; uniform
W8A8 keeps 0.774 (BOPs ratio 0.0625), the front reaches 0.753 at BOPs ratio 0.021
(mean 4.9 / 4.2 weight / activation bits) and 0.733 at 0.016 (W4A4).
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nemo_jax
from nemo_jax import data as data_lib

DATASET = "fashion_mnist_embedded"


class Block(nn.Module):
  dim: int
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x, deterministic=True):
    h = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(
        h, deterministic=deterministic)
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.Dense(self.dim, name="mlp2")(nn.gelu(nn.Dense(self.mlp, name="mlp1")(h)))
    return x + h


class ViT(nn.Module):
  """A tiny ViT for 28x28 images: 7x7 patches (16 tokens) + a class token."""
  num_classes: int = 10
  patch: int = 7
  dim: int = 32
  depth: int = 2
  heads: int = 2
  mlp: int = 64

  @nn.compact
  def __call__(self, x, deterministic=True):
    x = nn.Conv(self.dim, (self.patch, self.patch), strides=self.patch, padding="VALID",
                name="patch_embed")(x)
    x = x.reshape(x.shape[0], -1, self.dim)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
    for i in range(self.depth):
      x = Block(self.dim, self.heads, self.mlp, name=f"block{i}")(x, deterministic)
    return nn.Dense(self.num_classes, name="head")(nn.LayerNorm(name="ln")(x[:, 0]))


def make_model(seed: int = 0):
  """Factory for ``"model": "experiments/byo_vit.py:make_model"`` (untrained)."""
  vit = ViT()
  return vit, vit.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))


def train(vit, variables, x, y, epochs: int, seed: int = 0, batch: int = 128, lr: float = 3e-3):
  """A few epochs of AdamW with a cosine schedule (float); returns the variables."""
  steps = epochs * (len(x) // batch)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps),
                   weight_decay=1e-4)
  params = variables["params"]
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, xb, yb):
    def loss_fn(p):
      logits = vit.apply({"params": p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    order = rng.permutation(len(x))
    for s in range(len(x) // batch):
      idx = order[s * batch:(s + 1) * batch]
      params, opt, loss = step(params, opt, x[idx], y[idx])
    print(f"epoch {epoch + 1}/{epochs}: loss {float(loss):.3f}")
  return {"params": params}


def accuracy(vit, variables, x, y) -> float:
  logits = jax.jit(vit.apply)(variables, x)
  return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--generations", type=int, default=4)
  p.add_argument("--population", type=int, default=16)
  p.add_argument("--out", default=None)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  splits = {}
  for split in ("train", "test"):
    images, labels = data_lib.load_split(DATASET, split)
    splits[split] = (data_lib.preprocess(DATASET, images), labels.astype(np.int32))
  vit, variables = make_model(args.seed)
  t0 = time.perf_counter()
  variables = train(vit, variables, *splits["train"], epochs=args.epochs, seed=args.seed)
  train_s = time.perf_counter() - t0
  float_top1 = accuracy(vit, variables, *splits["test"])
  print(f"float ViT: test top-1 {float_top1:.4f} after {args.epochs} epochs ({train_s:.0f} s)")

  config = {"eval_per_class": 10, "calib_per_class": 10, "calib_batches": 2,
            "final_max_images": 1000, "population": args.population,
            "generations": args.generations, "edges": "dataflow", "min_species_size": 2,
            "species": [{"kind": "direct_round"}, {"kind": "direct_floor"},
                        {"kind": "gcn", "hidden": 16}, {"kind": "graph_unet", "hidden": 16}],
            "seed": args.seed}
  t0 = time.perf_counter()
  result = nemo_jax.search(config, out_dir=args.out, model=vit, variables=variables,
                           data=splits, progress=True)
  search_s = time.perf_counter() - t0
  print(nemo_jax.front_table(result.front, result.config.objectives))
  best8 = next(m for m in result.uniform if m["bits"] == 8)
  print(json.dumps({
      "float_test_top1": round(float_top1, 4), "train_seconds": round(train_s, 1),
      "search_seconds": round(search_s, 1), "front_size": len(result.front),
      "uniform_w8a8_final_top1": round(best8.get("final_top1", float("nan")), 4),
      "uniform_w8a8_bops_ratio": round(best8["metrics"]["bops_ratio"], 4),
      "front": [{"final_top1": round(m.get("final_top1", float("nan")), 4),
                 **{n: round(v, 4) for n, v in m["objectives"].items()}}
                for m in result.front[:8]]}))


if __name__ == "__main__":
  main()
