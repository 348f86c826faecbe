"""raystack: elastic compute for language models on Ray — train, sweep, serve and batch-infer a GPT."""

__version__ = "0.1.0"
