"""Interventions: steering plans, generation under edits, deactivation experiments, steering
scores and sweeps."""
