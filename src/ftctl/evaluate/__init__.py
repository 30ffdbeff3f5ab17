"""Generation-based evaluation of a run (or a model folder) on its held-out rows."""
