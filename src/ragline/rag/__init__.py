"""RAG models: marginalisation over passages (marginal), decoding and the model itself."""
