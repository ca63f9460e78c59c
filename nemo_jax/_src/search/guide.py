"""Sensitivity-informed search: what per-quantizer sensitivity tells the species.

Beyond the NEMO paper (documented as such in ``docs/DESIGN.md``, "Sensitivity-informed
search"): the per-quantizer sensitivity table (``run/sensitivity.py``: each searched
quantizer alone at each bit-width, the rest at 8) becomes a :class:`SearchGuide`:

* ``drop [N, K]``: the top-1 drop of searched node ``n`` at bit choice ``k`` (0 at and
  above the table's base), for GNN node features and mutation weights;
* ``frontier [F, N]``: a greedy, HAWQ-style allocation frontier (:func:`greedy_frontier`):
  from every node at the highest choice, repeatedly lower the node with the largest cost
  saving per sensitivity loss, down to every node at the lowest choice; its rows seed
  direct species (``seed_greedy``) and are the ``greedy`` baseline species.

The guide is data: species builders that declare a ``guide`` parameter receive it
(``species.build_groups``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

EPS = 1e-4
"""Smallest sensitivity loss a move is charged (noise can make a lower bit-width score
higher than a higher one; the move is then nearly free, not negative)."""


@dataclasses.dataclass(frozen=True)
class SearchGuide:
  """Sensitivity of a problem's searched nodes, and the greedy frontier it implies.

  Attributes:
    drop: float32 ``[N, K]`` top-1 drop (fraction) of each searched node alone at each
      bit choice (gene order, choice order).
    frontier: int32 ``[F, N]`` choice indices along the greedy frontier, costliest first.
    frontier_cost: float64 ``[F]`` the guide's cost of every frontier row (decreasing).
  """
  drop: np.ndarray
  frontier: np.ndarray
  frontier_cost: np.ndarray

  def __hash__(self):
    return hash((self.drop.tobytes(), self.frontier.tobytes()))

  def __eq__(self, other):
    return (isinstance(other, SearchGuide) and np.array_equal(self.drop, other.drop)
            and np.array_equal(self.frontier, other.frontier))

  def spread(self, count: int) -> np.ndarray:
    """``count`` frontier rows evenly spaced in cost (first and last included)."""
    if count <= 1:
      return self.frontier[:1]
    targets = np.linspace(self.frontier_cost[0], self.frontier_cost[-1], count)
    idx = [int(np.argmin(np.abs(self.frontier_cost - t))) for t in targets]
    return self.frontier[np.asarray(idx)]

  def mutation_weights(self) -> np.ndarray:
    """float32 ``[N]``: per gene, how readily it mutates (mean 1): insensitive nodes
    (small worst-case drop) more, sensitive ones less."""
    worst = np.max(self.drop, axis=1)
    w = 1.0 / (EPS + np.maximum(worst, 0.0) + 0.01)
    return (w / w.mean()).astype(np.float32)


def drop_matrix(table: Mapping, bit_choices: Sequence[int],
                active_nodes: Sequence[int]) -> np.ndarray:
  """``[N, K]`` drops of a sensitivity table (``run.sensitivity``) for the searched nodes
  in gene order and every bit choice (choices at or above the table's base: 0).

  Raises:
    ValueError: the table is not for these nodes.
  """
  index = {int(n): i for i, n in enumerate(table["node_index"])}
  missing = [n for n in active_nodes if int(n) not in index]
  if missing:
    raise ValueError(f"sensitivity: no entry for searched node(s) {missing[:5]}; allowed: a "
                     "table computed for this problem")
  out = np.zeros((len(active_nodes), len(bit_choices)), np.float32)
  for k, b in enumerate(bit_choices):
    if b in table["bits"]:
      j = table["bits"].index(b)
      out[:, k] = [table["drop"][index[int(n)]][j] for n in active_nodes]
  return out


def greedy_frontier(drop: np.ndarray, cost: Callable[[np.ndarray], np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray]:
  """A greedy allocation frontier (HAWQ-style).

  Start with every node at the highest choice; at each step, among the nodes not yet at
  the lowest choice, lower by one choice the node with the largest
  ``(cost saved) / max(sensitivity lost, EPS)`` (sensitivities add up across nodes: the
  first-order model of HAWQ / greedy bit allocation); stop when every node is at the
  lowest choice.

  Args:
    drop: ``[N, K]`` top-1 drop of each node alone at each choice.
    cost: ``choice [P, N] -> cost [P]`` (vectorised; smaller is cheaper).

  Returns:
    ``(rows int32 [F, N], costs float64 [F])``, ``F = N (K - 1) + 1``, costliest first.
  """
  n, k = drop.shape
  current = np.full(n, k - 1, np.int32)
  rows, costs = [current.copy()], [float(np.asarray(cost(current[None]))[0])]
  while np.any(current > 0):
    movable = np.nonzero(current > 0)[0]
    candidates = np.repeat(current[None], len(movable), axis=0)
    candidates[np.arange(len(movable)), movable] -= 1
    new_cost = np.asarray(cost(candidates), np.float64)
    saved = costs[-1] - new_cost
    lost = drop[movable, current[movable] - 1] - drop[movable, current[movable]]
    score = saved / np.maximum(lost, EPS)
    best = int(np.argmax(score))
    current = candidates[best]
    rows.append(current.copy())
    costs.append(float(new_cost[best]))
  return np.stack(rows).astype(np.int32), np.asarray(costs, np.float64)


def node_features(drop: np.ndarray, active_nodes: Sequence[int], num_nodes: int) -> np.ndarray:
  """``[num_nodes, K]`` node-feature columns: each searched node's drop per choice (0 for
  nodes not searched), for the GNN species (``sensitivity_features``)."""
  out = np.zeros((num_nodes, drop.shape[1]), np.float32)
  out[np.asarray(active_nodes, np.int64)] = drop
  return out
