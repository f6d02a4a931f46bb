"""One integer drives dilation: strides past the output stride become atrous rates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

OUTPUT_STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class StageStride:
    """How one stage of a backbone runs at a given output stride.

    Attributes:
        stride: the stride the stage applies (its nominal stride, or 1 once the
            output stride has been reached).
        rate_in: atrous rate before the stage, used by a convolution that holds
            the stride itself (MobileNetV2's depthwise 3x3): its taps are one
            fine-grid pixel apart either way.
        rate: atrous rate of every convolution after the stride point.
        reduction: the stage's output stride relative to the input image.
    """

    stride: int
    rate_in: int
    rate: int
    reduction: int


def check_output_stride(output_stride: object) -> int:
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(
            f"output_stride must be one of {list(OUTPUT_STRIDES)}, got {output_stride!r}"
        )
    return output_stride  # type: ignore[return-value]


def check_multi_grid(multi_grid: Sequence[int], units: int, block: str) -> tuple[int, ...]:
    """The multi-grid unit rates of ``block`` (v3 section 3.2), one per unit."""
    multi_grid = tuple(multi_grid)
    if len(multi_grid) != units or not all(isinstance(r, int) and r >= 1 for r in multi_grid):
        raise ValueError(
            f"multi_grid must be {units} positive integer unit rates (one per unit of "
            f"{block}), got {multi_grid!r}"
        )
    return multi_grid


def stage_strides(
    nominal_strides: Sequence[int], output_stride: int, stem_stride: int
) -> list[StageStride]:
    """Turns each stage's nominal stride into (stride, rates) for ``output_stride``.

    As in timm's ``make_blocks``: once the running stride reaches the output
    stride, a stage's stride is replaced by 1 and multiplies the atrous rate of
    everything after it (DESIGN.md, ResNet for v3).
    """
    check_output_stride(output_stride)
    current, rate = stem_stride, 1
    stages = []
    for nominal in nominal_strides:
        rate_in = rate
        if current * nominal > output_stride:
            rate *= nominal
            stride = 1
        else:
            current *= nominal
            stride = nominal
        stages.append(StageStride(stride, rate_in, rate, current))
    return stages
