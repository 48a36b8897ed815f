"""Small shared utilities: configuration, safe checkpoint I/O, logging, seeding."""
