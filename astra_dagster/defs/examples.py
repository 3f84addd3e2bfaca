"""The seed's example task, ``RNG.RandomNumberGeneratorTask``, as a Dagster asset."""

# No "from __future__ import annotations" here: Dagster reads Config annotations at runtime.

from typing import ClassVar

import dagster as dg
from pydantic import Field

from astra_dagster.lineage.batch import TaskBatch, TaskItem, run_tasks
from astra_dagster.lineage.config import AstraConfig
from astra_dagster.lineage.io_manager import RESULT_TABLE_KEY


class RandomNumberGeneratorTask(AstraConfig):
    """A task to generate random numbers."""

    task_family: ClassVar[str] = "RNG.RandomNumberGeneratorTask"

    seed: int = Field(description="The random seed to use.")
    draws: int = Field(default=1, description="The number of draws to make.")
    delay_time: int = Field(
        default=0, description="The number of seconds to wait before drawing random numbers."
    )


@dg.asset(
    group_name="examples",
    io_manager_key="astra_io_manager",
    kinds={"python", "postgres"},
    metadata={
        RESULT_TABLE_KEY: "random_number_generator",
        "astra/task_family": RandomNumberGeneratorTask.task_family,
    },
)
def random_number_generator(
    context: dg.AssetExecutionContext, config: RandomNumberGeneratorTask
) -> TaskBatch:
    """Seeded standard-normal draws, written to ``astra.random_number_generator``."""
    from astra_dagster.methods.examples import random_samples  # methods load with their op, not the code location

    return run_tasks(
        context,
        config,
        [TaskItem()],
        lambda _: {"samples": random_samples(config.seed, config.draws, config.delay_time)},
        table="random_number_generator",
        batch=False,
    )
