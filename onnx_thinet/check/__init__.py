"""Verification, cost metrics (params, FLOPs) and evaluation on labelled data."""
