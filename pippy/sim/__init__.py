"""Simulator: cost model, event simulation and renderers for schedules and real-run timelines."""
