"""pytest plugin entry point (registered via the pytest11 entry point). Filled in by the claims work."""
