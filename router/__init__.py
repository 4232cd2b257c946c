"""Router: config, gate, top-k, dispatch, fallback, combine, service and SDK."""
