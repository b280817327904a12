"""jaxprune.methods."""
