"""Pruning: masks as pytrees beside the params, criteria, schedules, sweeps, structured
compaction. The public API is exported here (`jaxmed.pruning.magnitude_masks(params, levels)`)."""

from jaxmed.pruning.criteria import (erk_distribution, global_masks_at_counts, layer_counts,
                                     magnitude_masks, magnitude_scores, masks_at_counts,
                                     masks_from_scores, num_scored, prune_count, random_scores,
                                     snip_scores, uniform_distribution)
from jaxmed.pruning.masks import (apply_masks, build_masks, count, default_predicate,
                                  difference, intersection, invert, layer_report,
                                  masked_optimizer, sparsity, stack, union, unstack)
from jaxmed.pruning.schedules import Gradual, OneShot, iterative_magnitude_pruning, make_schedule
from jaxmed.pruning.structured import channel_masks, compact, filter_l1_scores, resnet_units
from jaxmed.pruning.sweep import scores_for
from jaxmed.stacking import over_stack
from jaxmed.pruning.training import ScheduledPruning, initial_masks, recompute_masks

__all__ = [
    "apply_masks", "build_masks", "channel_masks", "compact", "count", "default_predicate",
    "difference", "erk_distribution", "filter_l1_scores", "global_masks_at_counts", "Gradual",
    "initial_masks", "intersection", "invert", "iterative_magnitude_pruning", "layer_counts",
    "layer_report", "magnitude_masks", "magnitude_scores", "make_schedule", "masked_optimizer",
    "masks_at_counts", "masks_from_scores", "num_scored", "OneShot", "over_stack",
    "prune_count", "random_scores", "recompute_masks", "resnet_units", "ScheduledPruning",
    "scores_for", "snip_scores", "sparsity", "stack", "uniform_distribution", "union",
    "unstack",
]
