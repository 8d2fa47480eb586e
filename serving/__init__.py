"""Serving: one data plane (`dataplane`) with thin transport adapters around it (BentoML HTTP in service.py,
Open Inference Protocol REST and gRPC in `oip`)."""
