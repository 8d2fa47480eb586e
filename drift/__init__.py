"""Drift reports of live inputs against each model's reference set (Evidently). Built in a later issue.

The reference set each model carries is written by `models.store` (``reference.parquet`` in the model's
BentoML store folder); the live inputs will come from the service's prediction log.
"""
