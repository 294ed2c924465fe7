"""Launching benchmark jobs (locally or on Slurm)."""
