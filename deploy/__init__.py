"""Deployment: the image's build hook, the container smoke test, the compose stack, Kubernetes and KServe
manifests, and the Grafana dashboard generator. See docs/deployment.md."""
