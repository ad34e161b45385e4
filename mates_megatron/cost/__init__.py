"""The projected cost of a selection round, before it is spent (``cost.round``), with its parts: the models' shapes
and the run's layout (``cost.shapes``), machine constants (``cost.machine``), the seconds of each kind of work on a
rank (``cost.seconds``) and of each phase of a round (``cost.phases``)."""

from mates_megatron.cost.machine import MACHINES, Machine, get_machine
from mates_megatron.cost.round import RoundCost, check_round_cost, project_mates_round
from mates_megatron.cost.seconds import RankSeconds
from mates_megatron.cost.shapes import Layout, TransformerShape

__all__ = [
    "MACHINES",
    "Layout",
    "Machine",
    "RankSeconds",
    "RoundCost",
    "TransformerShape",
    "check_round_cost",
    "get_machine",
    "project_mates_round",
]
