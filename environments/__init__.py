"""Environments that post scored rollouts, and the trajectory API server they post to."""
