"""Bridges to the field's standard tools: sentence-transformers (``st``), mteb (``mteb_encoder``), and the extra
files an exported folder carries for them and for stock transformers (``export``).

``export`` needs nothing beyond the kit's own dependencies; ``st`` and ``mteb_encoder`` import their library
(install the ``st`` / ``mteb`` extras).
"""
