"""Block-update schedules: which blocks each training step runs and trains.

`REGISTRY` is the one table of schedules: each entry names its `BlockSchedule` subclass and, for
a schedule with flags of its own, the config class that reads and validates them (its `prefix`
names them). `SCHEDULES` (the choices of `--block-update-schedule`), `build_schedule` and
`ScheduleFlags.validate` in `nanochat/config.py` all read it; each schedule lives in its own
module behind the interface of `base.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanochat.dynamic_suffix import DynamicSuffixConfig
from nanochat.schedules.base import BlockSchedule, ScheduleContext, StepPlan
from nanochat.schedules.depth_growth import DepthGrowthConfig, DepthGrowthSchedule
from nanochat.schedules.dynamic_suffix import DynamicSuffixSchedule
from nanochat.schedules.layer_drop import LayerDropConfig, LayerDropSchedule


@dataclass(frozen=True)
class ScheduleEntry:
    """One schedule: its class (whose `name` is the `--block-update-schedule` value) and, when it
    has flags of its own, the config class that reads them (`from_args(args)`, the attributes
    `<prefix>_<field>` of the parsed flags) and checks them (`validate(n_layer)`)."""
    schedule: type[BlockSchedule]
    config: type | None = None

    @property
    def name(self) -> str:
        return self.schedule.name

    @property
    def flag_prefix(self) -> str | None:
        """The prefix of its flags' attributes (`dyn_` for `--dyn-*`); None without flags."""
        return None if self.config is None else f"{self.config.prefix}_"

    def build(self, ctx: ScheduleContext, args: Any) -> BlockSchedule:
        if self.config is None:
            return self.schedule(ctx)
        return self.schedule(ctx, self.config.from_args(args))


REGISTRY: tuple[ScheduleEntry, ...] = (
    ScheduleEntry(BlockSchedule),  # full_update
    ScheduleEntry(DynamicSuffixSchedule, DynamicSuffixConfig),
    ScheduleEntry(LayerDropSchedule, LayerDropConfig),
    ScheduleEntry(DepthGrowthSchedule, DepthGrowthConfig),
)
SCHEDULES = tuple(entry.name for entry in REGISTRY)


def build_schedule(name: str, ctx: ScheduleContext, args: Any) -> BlockSchedule:
    """The schedule `name` with its flags read from `args` (the parsed flags)."""
    for entry in REGISTRY:
        if entry.name == name:
            return entry.build(ctx, args)
    raise ValueError(f"unknown block-update schedule {name!r}; choose from {', '.join(SCHEDULES)}")


__all__ = ["BlockSchedule", "ScheduleContext", "StepPlan", "REGISTRY", "SCHEDULES", "ScheduleEntry", "build_schedule"]
