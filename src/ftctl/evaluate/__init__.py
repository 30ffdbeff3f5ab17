"""Layer 7: generation-based evaluation of a run (or a model folder) on its held-out rows, and benchmarks."""
