"""apogeenet (moved from methods/apogeenet.py; split into modules next)."""

from astra_dagster.methods.apogeenet.model import *  # noqa: F403
from astra_dagster.methods.apogeenet.model import _conv, _Network, _pad_flat  # noqa: F401
