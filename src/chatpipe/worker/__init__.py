"""The conversation worker (``python -m chatpipe.worker``)."""
