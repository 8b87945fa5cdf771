"""Images and servers for the container test only (docker-compose.test.yml), and tests."""
