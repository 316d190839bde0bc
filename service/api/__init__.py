"""The REST API (FastAPI). It reads and writes the job store and the registries; it never imports the
worker or the runner (a test checks this)."""
