"""Solvers: channel selection and least-squares refits on plain arrays."""
