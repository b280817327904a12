"""jaxprune.inspect."""
