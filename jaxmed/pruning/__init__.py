"""Pruning: masks as pytrees beside the params, criteria, schedules, structured compaction."""
