"""Networks (LALIC, MambaIC, the bundled default model), weights and model cards.

A model is a ``base.CodingModel`` whose entropy coding is a tree of ``latent_codecs`` nodes; it
registers under a name in ``registry`` (one module per model, listed in ``registry.BUILTIN_MODULES``).
"""
