"""chatpipe: the chat pipeline that chatobs instruments.

Until the pipeline services land, it holds an example gateway-shaped service
(:mod:`chatpipe.example`) and the ``chatobs demo`` command that runs it.
"""

__all__: list[str] = []
