"""The network: stream protocols, listeners' admission, outbound connections, dialback verification, SRV resolution."""
