"""Coverage-guided fuzzing of the sans-IO decoders with atheris; `python -m tests.fuzz`."""
