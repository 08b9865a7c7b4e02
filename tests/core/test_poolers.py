"""Poolers are a component kind like any other: registered through a plugin, named in a policy
config, run between scorer and selector, checked at run time, and covered by the conformance kit.
The older ``span`` setting reads as the built-in ``span`` pooler, so saved policies keep loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import torch

import kvpolicy
from kvpolicy import Registry, UnknownComponentError
from kvpolicy.checkpoint import read_policy_file
from kvpolicy.errors import InvalidConfigError, InvalidScoresError, ShapeError
from kvpolicy.evolve.search_space import parameter_layout
from kvpolicy.testing import ConformanceError, check_component
from kvpolicy.types import ComponentRef, LayerView, PolicyConfig, Pooler, Requirements


@attrs.frozen
class CarryConfig:
    """``reach``: how many following cached tokens a score is carried to."""

    reach: int = attrs.field(default=1, validator=attrs.validators.ge(0))


class CarryPooler:
    """A third party's pooler: each token also takes the score of the ``reach`` tokens before it
    in cached order, so whatever follows a kept token is kept too."""

    name: ClassVar[str] = "carry"
    Config = CarryConfig

    def __init__(self, config: CarryConfig | None = None) -> None:
        self.config = config or CarryConfig()

    @property
    def requirements(self) -> Requirements:
        return Requirements()

    def pool(self, scores: torch.Tensor, view: LayerView) -> torch.Tensor:
        pooled = scores.clone()
        for shift in range(1, min(self.config.reach, scores.shape[-1] - 1) + 1):
            pooled[..., shift:] = torch.maximum(pooled[..., shift:], scores[..., :-shift])
        return pooled.masked_fill(view.positions < 0, float("-inf"))


class CarryPlugin:
    @kvpolicy.hookimpl
    def kvpolicy_register_poolers(self, register):
        register("carry", CarryPooler)


@pytest.fixture(scope="module")
def with_carry() -> Registry:
    registry = Registry()  # the built-ins from entry points, plus the third party registered in code
    assert registry.register_plugin(CarryPlugin(), name="kvpolicy-carry") == "kvpolicy-carry"
    return registry


def _h2o_view(tokens: int = 40) -> LayerView:
    """Accumulated attention that is flat except for two heavy hitters, at slots 10 and 20."""
    positions = torch.arange(tokens).view(1, 1, tokens)
    heavy = torch.full((1, 1, tokens), 0.01)
    heavy[0, 0, 10], heavy[0, 0, 20] = 5.0, 4.0
    return LayerView(layer=0, num_layers=1, positions=positions, seen=tokens, accumulated_attention=heavy)


def test_a_third_party_pooler_composes_with_h2o(with_carry):
    assert "pooler:carry" in {c for p in with_carry.plugins() for c in p.components}
    plain = kvpolicy.build("h2o", budget=8, registry=with_carry)
    carried = kvpolicy.build("h2o", budget=8, pooler=("carry", {"reach": 1}), registry=with_carry)
    assert isinstance(carried.pooler, Pooler) and "carry=CarryConfig(reach=1)" in repr(carried)
    kept_plain = set(plain.plan(_h2o_view()).indices[0, 0].tolist())
    kept_carried = set(carried.plan(_h2o_view()).indices[0, 0].tolist())
    assert {10, 20} <= kept_plain and 11 not in kept_plain and 21 not in kept_plain
    assert {10, 11, 20, 21} <= kept_carried  # each heavy hitter with the token after it
    again = kvpolicy.Policy.from_json(carried.to_json(), registry=with_carry)
    assert again.config.pooler == ComponentRef("carry", {"reach": 1}) == carried.config.pooler


def test_a_third_party_pooler_passes_the_conformance_checks(with_carry):
    passed = check_component(CarryPooler(CarryConfig(reach=2)), registry=with_carry)
    assert {"protocol", "output_shape", "padded_slots", "batch_permutation", "leaves_inputs_alone"} <= set(passed)


class LeakyPooler(CarryPooler):
    """Writes a score into padded slots: a defect the conformance kit must name."""

    def pool(self, scores: torch.Tensor, view: LayerView) -> torch.Tensor:
        return scores.nan_to_num(neginf=0.0)


def test_the_kit_names_a_pooler_that_lifts_padded_slots(with_carry):
    with pytest.raises(ConformanceError, match="padded_slots.*must stay -inf"):
        check_component(LeakyPooler(), registry=with_carry)


def test_unknown_pooler_names_are_unknown_component_errors():
    with pytest.raises(UnknownComponentError, match="Did you mean 'span'"):
        kvpolicy.build("h2o", budget=64, pooler="spam")
    with pytest.raises(UnknownComponentError, match="pooler"):
        kvpolicy.Policy.from_config(
            PolicyConfig.from_dict({"extractor": "position", "scorer": "feature", "selector": "top_k", "budget": 8,
                                    "schedule": {"kind": "every_step"}, "protect": {"sinks": 0, "recent": 0},
                                    "pooler": {"name": "no_such_pooler"}})
        )  # fmt: skip


class PlantedPooler(CarryPooler):
    """Applies ``plant`` to the scores: a real pooler with a chosen defect."""

    def __init__(self, plant) -> None:
        super().__init__()
        self.plant = plant

    def pool(self, scores: torch.Tensor, view: LayerView) -> torch.Tensor:
        return self.plant(scores.clone(), view)


def _padded_view() -> LayerView:
    """Two heads; head 1 keeps 3 fewer tokens than head 0, so its last 3 slots are padding."""
    positions = torch.arange(12).repeat(1, 2, 1)
    positions[0, 1, -3:] = -1
    return LayerView(layer=3, num_layers=4, positions=positions, seen=12)


def _choose(pooler, view: LayerView):
    policy = kvpolicy.Policy("position", ("feature", {"index": 0}), "top_k", budget=4, pooler=pooler)
    return policy.choose(view, policy.extract(view))


@pytest.mark.parametrize(
    ("plant", "error", "message"),
    [
        (lambda s, v: s[..., :-1], ShapeError, r"pooler 'carry' scores have shape \(1, 2, 11\)"),
        (lambda s, v: s.long(), InvalidScoresError, "pooler 'carry' returned torch.int64 scores on layer 3"),
        (
            lambda s, v: s.index_fill(-1, torch.tensor([2]), float("nan")),
            InvalidScoresError,
            r"pooler 'carry' returned NaN for 2 cached token\(s\) on layer 3",
        ),
    ],
)
def test_a_pooler_that_breaks_its_contract_is_a_named_error(plant, error, message):
    with pytest.raises(error, match=message):
        _choose(PlantedPooler(plant), _padded_view())


def test_padded_slots_stay_last_whatever_a_pooler_returns():
    """A pooler that lifts padded slots above every real token cannot make them displace one."""
    view = _padded_view()
    lifted = _choose(PlantedPooler(lambda s, v: s.masked_fill(v.positions < 0, 1e9)), view)
    honest = _choose(PlantedPooler(lambda s, v: s), view)
    assert torch.equal(lifted.indices, honest.indices)
    kept_positions = view.positions.gather(-1, lifted.indices)
    assert bool((kept_positions >= 0).all())


def test_pooler_and_span_together_are_refused():
    with pytest.raises(InvalidConfigError, match="give either pooler .* or span .*, not both"):
        kvpolicy.Policy("position", "feature", "top_k", budget=8, pooler="span", span=5)


def test_span_shorthand_and_pooler_build_the_same_policy():
    a = kvpolicy.build("tova", budget=64, span={"kernel": 7, "mode": "avg"})
    b = kvpolicy.build("tova", budget=64, pooler=("span", {"kernel": 7, "mode": "avg"}))
    c = kvpolicy.build("snapkv-span", pooler={"kernel": 7, "mode": "avg"})  # fields merged into the preset's
    assert a.config == b.config and a.config.pooler == c.config.pooler == ComponentRef(
        "span", {"kernel": 7, "mode": "avg"}
    )
    assert kvpolicy.build("snapkv-span", pooler=None).pooler is None
    assert "span=avg7" in repr(a)


def test_a_span_of_one_is_no_pooler_and_a_policy_config_has_no_span_key():
    off = kvpolicy.build("h2o", span=1)  # a kernel of 1 pools nothing: no pooler, none to run or print
    assert off.pooler is None and "span" not in repr(off)
    data = {
        "extractor": "position",
        "scorer": "feature",
        "selector": "top_k",
        "schedule": {"kind": "every_step"},
        "protect": {"sinks": 0, "recent": 0},
        "budget": 8,
    }
    with pytest.raises(InvalidConfigError, match="PolicyConfig has no field.*span.*pooler"):
        PolicyConfig.from_dict({**data, "span": 31})  # a policy file names its pooler


def test_the_namm_examples_start_file_loads_with_its_span_pooler():
    """The shipped NAMM's earlier parameters (the votes alone, spans of 31), the start of its search."""
    path = Path(__file__).parents[2] / "examples" / "namm-smollm2" / "start.safetensors"
    stored = json.loads(read_policy_file(str(path))[0]["policy"])
    assert stored["pooler"] == {"name": "span", "config": {"kernel": 31, "mode": "max"}}
    loaded = kvpolicy.Policy.load(str(path))
    assert loaded.config.pooler == ComponentRef("span", {"kernel": 31, "mode": "max"})
    assert repr(loaded).endswith("span=max31)")
    w_s = loaded.get_flat()[parameter_layout(loaded)["scorer.w_s"]]
    assert w_s[-1] == 1 and not w_s[:-1].any()  # one-hot on the log votes, as saved
    again = kvpolicy.Policy.from_json(loaded.to_json())
    assert again.config == loaded.config and json.loads(loaded.to_json())["pooler"]["name"] == "span"
