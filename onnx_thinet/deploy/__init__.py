"""Deployment to inference servers."""
