"""Where a request goes: the HTTP server, dispatch, the /v1 proxy, the upstream client, SSE."""
