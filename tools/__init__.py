"""The command-line tools, each run as `python tools/NAME.py`. A package so that tests and
benchmarks import them from the repository root (`from tools import preprocess_data`)."""
