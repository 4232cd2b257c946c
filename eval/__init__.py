"""Evaluation: datasets, metrics, harness and reports. Imports router and experts; nothing imports it."""
