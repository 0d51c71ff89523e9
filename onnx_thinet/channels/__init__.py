"""Channel analysis: layouts, per-op rules, and the prunable and coupled groups that follow."""
