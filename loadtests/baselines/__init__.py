"""Baseline servers the benchmark compares the service with."""
