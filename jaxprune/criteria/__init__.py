"""jaxprune.criteria."""
