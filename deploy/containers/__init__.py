"""Container images and the compose stack: build helpers, the stack driver, and the scripts
the images run (healthcheck.py, minio_init.py)."""
