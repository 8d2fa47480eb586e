"""The model lifecycle after training: what the registry holds and what a running service serves.

A stage of its own: it reads the MLflow registry and the services' own answers, and serving never imports it.
"""
