"""Doppler-style radial velocities (moved from methods/doppler.py; split into modules next)."""

from astra_dagster.methods.doppler.emulator import *  # noqa: F403
from astra_dagster.methods.doppler.fit import *  # noqa: F403
