"""Subcommands of the `jaxprune` command, one module each, each with `add_command(subparsers)`."""
