"""The search space: what a genome decodes to (choice indices over the searched nodes)."""

from __future__ import annotations

import dataclasses

import numpy as np

from nemo_jax._src.workload import KIND_ACTIVATION, KIND_WEIGHT


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """What the genomes decode to.

  Attributes:
    num_nodes: quantizer nodes of the workload graph (``workload.py``: activation and
      weight quantizers in trace order).
    active_nodes: indices of the nodes whose bit-width is searched.
    num_choices: number of bit choices K.
    num_keep: number of keep-ratio choices (1: no keep gene).
    node_kind: per node, ``workload.KIND_ACTIVATION`` (0) or ``KIND_WEIGHT`` (1); empty
      when unknown (a space built by hand).
  """
  num_nodes: int
  active_nodes: tuple[int, ...]
  num_choices: int
  num_keep: int
  node_kind: tuple[int, ...] = ()

  @property
  def num_genes(self) -> int:
    return len(self.active_nodes) + (1 if self.num_keep > 1 else 0)

  @property
  def active_kinds(self) -> np.ndarray:
    """int32 ``[num_active]``: the kind of every searched node, gene order."""
    if len(self.node_kind) != self.num_nodes:
      raise ValueError("node_kind: unknown for this search space (built without a "
                       "workload); allowed: a space from search_space(cfg, workload)")
    return np.asarray(self.node_kind, np.int32)[np.asarray(self.active_nodes, np.int64)]

  @property
  def weight_genes(self) -> np.ndarray:
    """Gene positions (into ``active_nodes``) of the searched weight quantizers."""
    return np.nonzero(self.active_kinds == KIND_WEIGHT)[0]

  @property
  def activation_genes(self) -> np.ndarray:
    """Gene positions (into ``active_nodes``) of the searched activation quantizers."""
    return np.nonzero(self.active_kinds == KIND_ACTIVATION)[0]


def search_space(workload, quantize_activations: bool, num_choices: int,
                 num_keep: int) -> SearchSpace:
  """The space of a workload: every node (``quantize_activations``) or its weights only."""
  num_nodes = workload.num_quantizers
  if quantize_activations:
    active = tuple(range(num_nodes))
  else:
    active = tuple(int(n) for n in np.nonzero(workload.node_kind == KIND_WEIGHT)[0])
  return SearchSpace(num_nodes=num_nodes, active_nodes=active, num_choices=num_choices,
                     num_keep=num_keep, node_kind=tuple(int(k) for k in workload.node_kind))
