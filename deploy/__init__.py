"""Deployment files. ``deploy.containers`` holds the tooling that builds and runs the container
stack on a host without an image registry (the container test, the benchmark)."""
