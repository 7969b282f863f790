"""maskc inside other libraries' models.

Each integration sits on top of maskc's public API (``maskc.compile``, the
constructors, ``CompiledMask.__call__``) and is imported on its own, so that
``import maskc`` never imports the library it serves:

* ``maskc.integrations.transformers``: ``attn_implementation="maskc"`` for
  Hugging Face transformers (``pip install maskc[transformers]``).
"""
