"""The `largeforge` command line: thin commands over the library API."""
