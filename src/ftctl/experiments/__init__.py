"""Layer 8: sweeps, the runs listing, the planner and data preview."""
