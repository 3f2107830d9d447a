"""Command-line tools: thin shells over tome_deploy.pipeline."""
