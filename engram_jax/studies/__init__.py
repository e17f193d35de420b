"""Studies: analyses and experiments run on trained workdirs (imports the training side
lazily; the core never imports this package)."""
