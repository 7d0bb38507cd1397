"""Tools for development, tests and the demo: the tiny model, the whole loop on one box."""
