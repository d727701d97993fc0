"""Networks (LALIC, MambaIC, the bundled default model), weights and model cards."""
