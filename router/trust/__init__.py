"""Trust: authorization policy, certificate paths and identities, TLS contexts, test and self-signed certificates."""
