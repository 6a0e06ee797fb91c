"""Fault isolation (issue 11): Entra ID down or hanging, Redis paused, under load, with
real processes; see conftest.py for the topology."""
