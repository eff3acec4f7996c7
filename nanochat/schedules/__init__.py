"""Block-update schedules: which blocks each training step runs and trains.

`build_schedule(name, ctx, args)` is the one place that maps `--block-update-schedule` to a
class; each schedule lives in its own module behind the interface of `base.py`.
"""
from __future__ import annotations

from typing import Any

from nanochat.schedules.base import BlockSchedule, ScheduleContext, StepPlan

SCHEDULES = ("full_update", "dynamic_suffix", "layer_drop", "depth_growth")


def build_schedule(name: str, ctx: ScheduleContext, args: Any) -> BlockSchedule:
    """The schedule `name` with its flags read from `args` (the parsed flags)."""
    if name == "full_update":
        return BlockSchedule(ctx)
    if name == "dynamic_suffix":
        from nanochat.dynamic_suffix import DynamicSuffixConfig  # noqa: PLC0415
        from nanochat.schedules.dynamic_suffix import DynamicSuffixSchedule  # noqa: PLC0415
        return DynamicSuffixSchedule(ctx, DynamicSuffixConfig.from_args(args))
    if name == "layer_drop":
        from nanochat.schedules.layer_drop import LayerDropConfig, LayerDropSchedule  # noqa: PLC0415
        return LayerDropSchedule(ctx, LayerDropConfig.from_args(args))
    if name == "depth_growth":
        from nanochat.schedules.depth_growth import DepthGrowthConfig, DepthGrowthSchedule  # noqa: PLC0415
        return DepthGrowthSchedule(ctx, DepthGrowthConfig.from_args(args))
    raise ValueError(f"unknown block-update schedule {name!r}; choose from {', '.join(SCHEDULES)}")


__all__ = ["BlockSchedule", "ScheduleContext", "StepPlan", "SCHEDULES", "build_schedule"]
