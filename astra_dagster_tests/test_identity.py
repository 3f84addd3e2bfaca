"""Task identity (contract 2): luigi-style serialisation, the seed's task_ids, full hashes."""

from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic import Field

from astra_dagster.lineage.config import AstraConfig, config_class
from astra_dagster.lineage.identity import (
    TaskIdentity,
    family_of,
    full_hash,
    serialize_parameter,
    short_hash,
)


class ExampleTypes(AstraConfig):
    task_family: ClassVar[str] = "Test.ExampleTypes"
    number: float = 1.0
    count: int = 2
    flag: bool = False
    name: str = "x"
    labels: list[str] = Field(default=["teff", "logg"])
    maybe: int | None = None


def test_serialisation_matches_luigi() -> None:
    assert serialize_parameter(3) == "3"
    assert serialize_parameter(0.1) == "0.1"
    assert serialize_parameter(1.0) == "1.0"
    assert serialize_parameter(True) == "True"
    assert serialize_parameter(False) == "False"
    assert serialize_parameter(None) == ""
    assert serialize_parameter("a b") == "a b"
    assert serialize_parameter(["TEFF", "LOGG"]) == '["TEFF","LOGG"]'
    assert serialize_parameter({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


def test_seed_example_task_ids_are_reproduced() -> None:
    from astra_dagster.defs.examples import RandomNumberGeneratorTask

    expected = {
        (0, 1, 0): "RNG.RandomNumberGeneratorTask_36a542f0",
        (0, 10, 0): "RNG.RandomNumberGeneratorTask_ced8556d",
        (3, 2, 5): "RNG.RandomNumberGeneratorTask_41bbabea",
        (5, 1, 3): "RNG.RandomNumberGeneratorTask_5abe446d",
    }
    for (seed, draws, delay), task_id in expected.items():
        config = RandomNumberGeneratorTask(seed=seed, draws=draws, delay_time=delay)
        assert config.identity().task_id == task_id
    # Defaults give the same task as spelling them out.
    assert (RandomNumberGeneratorTask(seed=0).identity()
            == RandomNumberGeneratorTask(seed=0, draws=1, delay_time=0).identity())


def test_version_parameters_are_always_included_and_overridable() -> None:
    from astra_dagster.defs.examples import RandomNumberGeneratorTask

    default = RandomNumberGeneratorTask(seed=0).identity()
    assert default.params["astra_version_major"] == "0"
    assert default.params["astra_version_minor"] == "1"
    bumped = RandomNumberGeneratorTask(seed=0, astra_version_minor=2).identity()
    assert bumped.task_id != default.task_id
    # force is an execution knob, not part of the identity
    assert RandomNumberGeneratorTask(seed=0, force=True).identity() == default


def test_values_are_normalised_by_config_types() -> None:
    assert ExampleTypes(number=1).identity() == ExampleTypes(number=1.0).identity()
    assert ExampleTypes(number=1).identity().params["number"] == "1.0"
    assert ExampleTypes(count=2).identity() == ExampleTypes().identity()


def test_full_hash_is_the_unique_key_and_includes_the_family() -> None:
    params = {"a": "1"}
    one = TaskIdentity.build("m", "NS.One", params)
    two = TaskIdentity.build("m", "NS.Two", params)
    assert one.task_id.endswith(short_hash(params)) and two.task_id.endswith(short_hash(params))
    assert one.task_hash != two.task_hash
    assert len(one.task_hash) == 64 and one.task_hash == full_hash("NS.One", params)


def test_short_ids_collide_where_full_hashes_do_not() -> None:
    # 8 hex digits are 32 bits: a collision turns up within ~100k random tasks (birthday bound).
    seen: dict[str, str] = {}
    for i in range(200_000):
        ident = TaskIdentity.build("m", "NS.F", {"source_id": f"S{i}"})
        other = seen.setdefault(ident.task_id, ident.task_hash)
        if other != ident.task_hash:
            break
    else:
        pytest.fail("no 8-hex collision in 200k tasks (expected about 99 %)")


def test_config_round_trips_through_parameter_strings() -> None:
    config = ExampleTypes(number=2.5, count=7, flag=True, name="it's; drop table x; --",
                          labels=["fe_h"], maybe=None)
    ident = config.identity({"source_id": "2M0001"})
    rebuilt, rest = ExampleTypes.from_params(ident.params)
    assert rebuilt == config
    assert rest == {"source_id": "2M0001"}
    assert rebuilt.identity(rest) == ident


def test_registry_and_family_parsing() -> None:
    assert config_class("Test.ExampleTypes") is ExampleTypes
    assert family_of("RNG.RandomNumberGeneratorTask_36a542f0") == "RNG.RandomNumberGeneratorTask"
    assert family_of("NS.Some_Family_deadbeef") == "NS.Some_Family"
    with pytest.raises(ValueError):
        family_of("nohash")
    with pytest.raises(KeyError):
        config_class("No.Such")
