"""Framework plugins, one module per framework; each is imported only when chosen."""
