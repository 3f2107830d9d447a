"""Command-line tools: argparse and printing only, one thin shell per command over the library (the export and validation jobs, serving, engine build, visualisation)."""
