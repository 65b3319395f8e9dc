"""router: an XMPP server-to-server federation relay (see README.md and docs/architecture.md)."""
