"""Load tests (locust scenarios) and the benchmark against FastAPI and MLServer (`make bench`)."""
