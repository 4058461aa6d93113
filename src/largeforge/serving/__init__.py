"""Serving: the OpenAI-compatible API over the continuous-batching engine, auth, limits,
metrics; experts and the router across them."""
