"""Study results: stamped per-problem records, intervals with the right unit, generated tables."""
