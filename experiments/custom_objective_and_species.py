"""Adding an objective and a species without editing the library.

1. A cost: a latency lookup table (made-up numbers: ns per MAC by weight bit-width),
   used as an objective by name.
2. A species: "all_same" genomes are ONE gene (index into bit_choices) applied to every
   quantizer, varied by Gaussian noise; its plain init/vary/decode functions become a
   species group with ``nemo_jax.evolution.ga_group`` and it is used by name in the
   species list.

Both are handed to the search explicitly, in a ``nemo_jax.Registries`` value (the
Python API). For the command line and for ``--resume`` the config names them as
plugins instead, so a later process imports them again (``--plugins`` below):

    "custom_costs": {"latency_ms": "experiments/custom_objective_and_species.py:latency_ms"}

    python experiments/custom_objective_and_species.py [--generations 2] [--plugins]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import nemo_jax
from nemo_jax import evolution

# ns per MAC for weight bit-widths 0..32 (index = bits): cheaper at low precision.
LATENCY_NS_PER_MAC = jnp.asarray(np.r_[np.zeros(1), np.linspace(0.2, 1.0, 8),
                                       np.ones(24)], jnp.float32)


def latency_ms(workload, configs):
  """Latency lookup: sum over layers of MACs x table[w_bits] (ms per image; minimised)."""
  macs = jnp.asarray(workload.macs, jnp.float32)
  return jnp.sum(macs * LATENCY_NS_PER_MAC[configs.w_bits], axis=-1) * 1e-6


def all_same_species(space, specs, species_indices, capacity, graph, feature_dim):
  """One gene per genome; every searched quantizer gets the same bit choice."""
  k = space.num_choices

  def init(key):
    return jax.random.uniform(key, (len(specs), capacity, 1), maxval=k - 1.0)

  def decode(genomes):
    idx = jnp.clip(jnp.round(genomes[..., 0]), 0, k - 1).astype(jnp.int32)
    choice = jnp.broadcast_to(idx[..., None], idx.shape + (len(space.active_nodes),))
    return choice, jnp.zeros(idx.shape, jnp.int32)

  def vary(key, parents, priority, sizes):
    noise = 0.7 * jax.random.normal(key, parents.shape)
    return jnp.clip(parents + noise, 0.0, k - 1.0)

  # A genetic algorithm: the joint ranking keeps the best of parents + offspring.
  return evolution.ga_group("all_same", species_indices, init, vary, decode)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--generations", type=int, default=2)
  p.add_argument("--out", default=None)
  p.add_argument("--plugins", action="store_true",
                 help="name the cost and species in the config (CLI / resume style)")
  args = p.parse_args(argv)
  config = os.path.join(os.path.dirname(__file__), "configs", "smoke.py")
  overrides = dict(generations=args.generations, final_split=None,
                   objectives=["top1_error", "latency_ms", "model_ratio"],
                   species=["direct_round", "all_same"])
  if args.plugins:
    here = os.path.abspath(__file__)
    overrides.update(custom_costs={"latency_ms": f"{here}:latency_ms"},
                     custom_species={"all_same": f"{here}:all_same_species"})
    registries = None
  else:
    registries = (nemo_jax.Registries().with_cost("latency_ms", latency_ms)
                  .with_species("all_same", all_same_species))
  result = nemo_jax.search(config, out_dir=args.out, registries=registries, **overrides)
  for m in result.front[:5]:
    print(m["species"], {k: round(v, 4) for k, v in m["objectives"].items()})
  return result


if __name__ == "__main__":
  main()
