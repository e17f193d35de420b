"""Input pipelines: text (LM) and images, built on grain."""
