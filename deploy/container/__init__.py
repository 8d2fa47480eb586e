"""The container smoke test: build the image, run it, call it (python -m deploy.container.smoke)."""
