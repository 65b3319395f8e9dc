"""S2S stream negotiation as sans-IO code: `session.Session` is one connection's protocol object.

Modules, each importing only those listed before it:

* `pairs`, `events`, `features`, `config`: `Pair(local, remote)` and the
  containers a session keeps pairs in, what a session reports, the
  ``<stream:features/>`` element, `SessionConfig`;
* `state`: the stages of a stream, their transition table, and `Negotiator`,
  the session as feature modules see it;
* `headers`: checking the peer's stream header and writing ours;
* `tls`, `sasl`, `dialback`, `bidi`: one stream feature each, same shape
  (offer, choose, element handlers);
* `negotiate`: which feature comes next, in either role;
* `authorization`, `opening`: the session's mixins (pairs authorized and
  pending; per-stream state and the header and features exchange);
* `session`: `Session`, the public API.
"""
