"""The tool executor (``python -m chatpipe.tools``) and the tools it runs."""
