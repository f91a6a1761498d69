"""Command-line interface: thin wrappers that parse, call `replacement`/`graphs`, and print."""
