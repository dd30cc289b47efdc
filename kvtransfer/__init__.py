"""KV transfer: codecs, transports and the per-(prefill, decode) channel."""
