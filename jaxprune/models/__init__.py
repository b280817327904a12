"""jaxprune.models."""
