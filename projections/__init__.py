"""Projections of the event store into query views (issue: projections)."""
