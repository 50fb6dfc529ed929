"""Simulation and evaluation, apart from the pipeline steps: synthetic micrographs with a known
truth (`sample`, its physics and files), the quality metrics against that truth (`quality`), the
demo's report (`report`) and the demo that chains every step on them (`demo`)."""
