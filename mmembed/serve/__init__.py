"""The embedding server (``mmembed-serve``): OpenAI-shaped ``/v1/embeddings`` on LitServe.

``mmembed.serve.protocol`` (request validation, responses) imports no server code; ``mmembed.serve.server`` needs
the ``serve`` extra (litserve).
"""

from mmembed.serve.protocol import Limits, RequestError, parse_embedding_request, parse_rerank_request

__all__ = ["Limits", "RequestError", "parse_embedding_request", "parse_rerank_request"]
