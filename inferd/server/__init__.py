"""OpenAI-compatible HTTP server (FastAPI): protocol models, endpoints, metrics, the `serve` command."""
