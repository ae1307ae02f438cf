"""Benchmark of the CDS service against a no-op Flask app under the same gunicorn configuration."""
