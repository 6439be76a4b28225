"""The thin runtime: engine backends, the NumPy TrigFlow scheduler, SprintPipeline. Imports no torch."""
