"""The sectioned configuration, QuantSpec and the registries (docs/DESIGN.md, "Configuration")."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemo_jax
from nemo_jax import QuantSpec, evaluation, evolution, models
from nemo_jax._src.problem import fitness_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "configs", "smoke.py")


# --------------------------------------------------------------------------- sections


def test_flat_and_sectioned_configs_load_to_the_same_value():
  sectioned = nemo_jax.load_search_config(SMOKE)
  flat = nemo_jax.load_search_config(sectioned.flat_dict())
  assert flat == sectioned
  assert nemo_jax.load_search_config(sectioned.to_dict()) == sectioned
  # to_dict is plain JSON and round-trips.
  assert nemo_jax.load_search_config(json.loads(json.dumps(sectioned.to_dict()))) == sectioned
  # Flat overrides land in their sections, quantizer fields in problem.quant.
  cfg = nemo_jax.load_search_config(SMOKE, population=12, weight_quant="symmetric_per_tensor",
                                    final_max_images=30)
  assert cfg.search.population == 12 and cfg.population == 12
  assert cfg.problem.quant.weight_quant == "symmetric_per_tensor"
  assert cfg.problem.quant.calibration == sectioned.problem.quant.calibration
  assert cfg.run.final_max_images == 30
  # Mixed: a section beside a flat key.
  mixed = nemo_jax.load_search_config({"search": {"population": 20}, "generations": 1})
  assert (mixed.search.population, mixed.search.generations) == (20, 1)
  # The default file is the embedded default.
  assert nemo_jax.load_search_config(
      os.path.join(REPO, "experiments", "configs", "default.py")) == nemo_jax.SearchConfig()


@pytest.mark.parametrize("bad, match", [
    ({"populaton": 8}, r"unknown key 'populaton'.*population"),
    ({"search": {"objectives": ["top1_error"]}}, r"search config: unknown key"),
    ({"problem": {"weight_quant": "x"}}, r"problem config: unknown key"),
    ({"problem": {"quant": {"weight_quant": "nope"}}}, r"weight_quant='nope' is invalid"),
    ({"problem": {"quant": {"wq": 1}}}, r"quant: unknown key"),
    ({"search": {"population": 2}}, r"population=2 is invalid"),
    ({"run": {"final_split": "nope"}}, r"final_split='nope' is invalid"),
    ({"problem": {"objectives": ["top1_error", "nope"]}}, r"objectives='nope' is invalid"),
    ({"hv_ref": [1.0]}, r"hv_ref=\[1.0\] is invalid; allowed: 3 numbers"),
    ({"problem": 3}, r"problem=3 is invalid; allowed: a mapping"),
])
def test_each_section_validates_itself_and_names_the_field(bad, match):
  with pytest.raises(ValueError, match=match):
    nemo_jax.load_search_config(bad)


def test_sections_are_usable_on_their_own():
  reg = nemo_jax.Registries()
  p = nemo_jax.ProblemConfig.from_dict({"objectives": ["top1_error", "bops_ratio"]},
                                       reg.costs, reg.models, reg.schemes)
  assert p.cost_names == ("model_ratio", "bops_ratio") and p.needs_accuracy
  with pytest.raises(ValueError, match="eval_per_class"):
    nemo_jax.ProblemConfig.from_dict({"eval_per_class": 0}, reg.costs, reg.models, reg.schemes)
  s = nemo_jax.EvolutionConfig.from_dict({"species": ["gcn"], "population": 8}, reg.species,
                                         nemo_jax.costs.ALL_FEATURE_NAMES)
  assert s.species[0].params == evolution.GNNParams()
  with pytest.raises(ValueError, match="species"):
    nemo_jax.EvolutionConfig.from_dict({"species": ["nope"]}, reg.species, ())
  r = nemo_jax.RunConfig.from_dict({"final_split": None}, ("train", "test"))
  assert r.final_split is None


def test_species_parameters_belong_to_their_kind():
  cfg = nemo_jax.load_search_config(SMOKE, species=[
      {"kind": "graph_unet", "hidden": 4, "depth": 2},
      {"kind": "direct_floor", "seed_uniform": True}, "gcn"])
  unet, floor, gcn = cfg.search.species
  assert isinstance(unet.params, evolution.GraphUNetParams) and unet.params.depth == 2
  assert isinstance(floor.params, evolution.DirectParams) and floor.params.seed_uniform
  assert gcn.params == evolution.GNNParams()
  # Each parameter only on its kind; the message names species[i].PARAM.
  for spec, match in (({"kind": "gcn", "depth": 2}, r"species\[0\]\.depth: not a parameter"),
                      ({"kind": "direct_round", "hidden": 8}, r"species\[0\]\.hidden"),
                      ({"kind": "random", "seed_uniform": True},
                       r"species\[0\]\.seed_uniform")):
    with pytest.raises(ValueError, match=match):
      nemo_jax.load_search_config(SMOKE, species=[spec])


@dataclasses.dataclass(frozen=True)
class _WidthParams:
  width: int = 1

  def validate(self, field):
    if not isinstance(self.width, int) or self.width < 1:
      raise ValueError(f"{field}.width={self.width!r} is invalid; allowed: an integer >= 1")


def _width_species(space, specs, species_indices, capacity, graph, feature_dim):
  widths = jnp.asarray([s.params.width for s in specs], jnp.float32)
  k = space.num_choices

  def init(key):
    return jnp.broadcast_to(jnp.minimum(widths, k - 1)[:, None, None],
                            (len(specs), capacity, 1))

  def decode(genomes):
    idx = genomes[..., 0].astype(jnp.int32)
    return (jnp.broadcast_to(idx[..., None], idx.shape + (len(space.active_nodes),)),
            jnp.zeros(idx.shape, jnp.int32))

  return evolution.ga_group("width", species_indices, init, lambda k_, p, pr, s: p, decode)


def test_a_custom_species_takes_its_parameters_from_the_config():
  reg = nemo_jax.Registries().with_species("width", _width_species, params=_WidthParams)
  cfg = nemo_jax.load_search_config(SMOKE, reg, species=[{"kind": "width", "width": 3},
                                                         "direct_round"])
  assert cfg.search.species[0].params == _WidthParams(3)
  assert cfg.to_dict()["search"]["species"][0]["width"] == 3
  with pytest.raises(ValueError, match=r"species\[0\]\.width=0 is invalid"):
    nemo_jax.load_search_config(SMOKE, reg, species=[{"kind": "width", "width": 0}])
  with pytest.raises(ValueError, match=r"species\[0\]\.depth: not a parameter of kind 'width'"):
    nemo_jax.load_search_config(SMOKE, reg, species=[{"kind": "width", "depth": 0}])
  # Without params a kind takes none (the earlier behaviour of custom kinds).
  plain = nemo_jax.Registries().with_species("width", _width_species)
  with pytest.raises(ValueError, match="takes no parameters"):
    nemo_jax.load_search_config(SMOKE, plain, species=[{"kind": "width", "width": 3}])
  # The builder receives the parameters: every member of the species decodes to choice 3.
  space = evolution.SearchSpace(num_nodes=4, active_nodes=(0, 1, 2, 3), num_choices=7,
                                num_keep=1)
  engine = evolution.Engine(cfg.search, space, None, 1, ("top1_error", "model_ratio"),
                            reg.species, num_objectives=2)
  state, batch = engine.init_state(jax.random.key(0))
  width_rows = np.asarray(batch.choice)[:int(np.asarray(state.sizes)[0])]
  assert (width_rows == 3).all()


def test_registries_hold_models_and_schemes_as_values():
  zoo = models.ZOO
  reg = nemo_jax.Registries().with_model(
      "tiny_resnet", lambda shape, classes, **kw: models.get_model("resnet20", shape, classes),
      (28, 28, 1), 10)
  assert "tiny_resnet" in reg.models and "tiny_resnet" not in zoo   # no global state
  cfg = nemo_jax.load_search_config(SMOKE, reg, model="tiny_resnet", checkpoint="x.msgpack")
  assert cfg.problem.model == "tiny_resnet"
  with pytest.raises(ValueError, match="model='tiny_resnet' is invalid"):
    nemo_jax.load_search_config(SMOKE, model="tiny_resnet")
  calls = []

  def my_scheme(source, spec, calibration, tables):
    calls.append(spec)
    return evaluation.ptq_scheme(calibration, spec, tables)

  reg = nemo_jax.Registries().with_scheme("mine", my_scheme)
  cfg = nemo_jax.load_search_config(SMOKE, reg, scheme="mine")
  problem = nemo_jax.build_problem(cfg, reg, progress=False)
  assert calls == [cfg.problem.quant] and problem.scheme.name == "ptq"
  with pytest.raises(ValueError, match="scheme='mine' is invalid"):
    nemo_jax.load_search_config(SMOKE, scheme="mine")


def test_a_problem_built_for_another_config_is_refused():
  cfg = nemo_jax.load_search_config(SMOKE, generations=0, final_split=None,
                                    selection_per_class=0)
  problem = nemo_jax.build_problem(cfg, progress=False)
  with pytest.raises(ValueError, match=r"problem: built for eval_per_class=2.*eval_per_class=3"):
    nemo_jax.search(cfg, problem=problem, progress=False, eval_per_class=3)
  with pytest.raises(ValueError, match=r"problem: built for data_seed=0.*data_seed=1"):
    nemo_jax.search(cfg, problem=problem, progress=False, seed=1)
  # Another search seed on the same images: data_seed fixed.
  fixed = nemo_jax.load_search_config(cfg, data_seed=0)
  shared = nemo_jax.build_problem(fixed, progress=False)
  res = nemo_jax.search(fixed, problem=shared, progress=False, seed=1)
  assert res.config.search.seed == 1 and res.front


# --------------------------------------------------------------------------- QuantSpec


@pytest.mark.parametrize("field, value", [
    ("weight_quant", "nope"), ("weight_range", "wide"), ("act_quant", "x"),
    ("activation_format", "int4"), ("placement", "everywhere"), ("calibration", "magic")])
def test_quant_spec_validates_every_field(field, value):
  with pytest.raises(ValueError, match=f"{field}={value!r} is invalid"):
    QuantSpec(**{field: value})


def test_quant_spec_defaults_are_nemos_and_the_search_defaults():
  assert QuantSpec() == evaluation.NEMO == nemo_jax.SearchConfig().problem.quant
  assert (QuantSpec().weight_quant, QuantSpec().act_quant, QuantSpec().calibration) == (
      "asymmetric_per_channel", "affine", "minmax")
  assert QuantSpec().resolved_weight_range == "full"
  assert evaluation.EMOMC.resolved_weight_range == "narrow"
  with pytest.raises(ValueError, match="act_quant='symmetric' is invalid"):
    QuantSpec(act_quant="symmetric", activation_format="fp16")


def test_public_building_blocks_with_defaults_evaluate_what_a_default_search_does():
  # The default search's quantizers (QuantSpec()), built from the public pieces with
  # default arguments only: calibrate -> ptq_scheme(calibration) -> Evaluator, and
  # QContext.from_config(config, calibration); both equal the search's own scores.
  cfg = nemo_jax.load_search_config(SMOKE, final_split=None, selection_per_class=0,
                                    keep_choices=[0.6, 1.0])
  assert cfg.problem.quant == QuantSpec()
  problem = nemo_jax.build_problem(cfg, progress=False)
  # The shipped checkpoint's held-out images (its metadata) are not fitness images.
  x_fit, y_fit, x_calib = fitness_data(cfg.problem, cfg.image_seed, 0,
                                       held_out=problem.held_out)
  model, variables = models.load_default_model()
  batch = max(1, len(x_calib) // cfg.problem.calib_batches)
  calibration = evaluation.calibrate(model, variables, x_calib, batch_size=batch)
  np.testing.assert_array_equal(calibration.lo, problem.calibration.lo)
  evaluator = evaluation.Evaluator(model, variables, evaluation.ptq_scheme(calibration),
                                   x_fit, y_fit)
  rng = np.random.default_rng(0)
  L, La = problem.workload.num_layers, problem.workload.num_act_quantizers
  configs = problem.configs([0.6, 1.0, 1.0], rng.choice([2, 3, 4, 8], (3, L)),
                            rng.choice([3, 4, 8], (3, La)))
  ours = evaluator(configs)
  theirs = problem.evaluator(configs)
  np.testing.assert_array_equal(np.asarray(ours.top1), np.asarray(theirs.top1))
  np.testing.assert_array_equal(np.asarray(ours.loss), np.asarray(theirs.loss))
  # One member through QContext.from_config: the evaluator's forward pass (its kernels
  # are computed in another XLA program, so an activation at a rounding boundary may
  # flip one step: most logits agree to float noise, top-1 on nearly every image).
  one = jax.tree.map(lambda x: x[0], configs)
  ctx_logits = np.asarray(jax.jit(lambda v, x: model.apply(
      v, x, models.QContext.from_config(one, calibration), train=False))(variables, x_fit))
  member = evaluation.member_logits(model, variables, problem.scheme, one, x_fit)
  close = np.all(np.abs(ctx_logits - member) <= 1e-4 * np.abs(member).max(), axis=1)
  assert close.mean() >= 0.5, close.mean()
  assert (np.argmax(ctx_logits, -1) == np.argmax(member, -1)).mean() >= 0.9
  # A QContext with another spec is another quantizer: its logits differ.
  other = np.asarray(jax.jit(lambda v, x: model.apply(v, x, models.QContext.from_config(
      one, calibration, spec=QuantSpec(weight_quant="symmetric_per_channel")),
      train=False))(variables, x_fit))
  assert not np.all(np.abs(other - member) <= 1e-4 * np.abs(member).max(), axis=1).mean() > 0.9


def test_label_free_fitness_scores_disagreement_with_the_float_model():
  cfg = nemo_jax.load_search_config(SMOKE, fitness_labels="float", final_split=None,
                                    selection_per_class=0)
  problem = nemo_jax.build_problem(cfg, progress=False)
  L, La = problem.workload.num_layers, problem.workload.num_act_quantizers
  fp32 = problem.configs([1.0], [[32] * L], [[32] * La])
  assert problem.accuracy(fp32)["top1_error"][0] == 0.0   # the float model agrees with itself
  w2 = problem.configs([1.0], [[2] * L], [[2] * La])
  assert problem.accuracy(w2)["top1_error"][0] > 0.3
  with pytest.raises(ValueError, match="fitness_labels='soft' is invalid"):
    nemo_jax.load_search_config(SMOKE, fitness_labels="soft")
