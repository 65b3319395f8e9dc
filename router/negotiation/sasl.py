"""SASL EXTERNAL for S2S (RFC 6120 §6, XEP-0178) in both roles.

Receiver: EXTERNAL is offered only on an encrypted stream whose peer
certificate chains to our trust store and names the header's ``from`` domain
(`router.trust.certs.peer_status`); the authzid may be absent (``=``) or that
domain. Failures are counted; past `SessionConfig.sasl_max_failures` the
stream closes with ``<policy-violation/>`` (§6.4.5). A failed EXTERNAL leaves
the stream open for dialback (XEP-0178 §3 step 11b).

Initiator: tries EXTERNAL first when offered and we present a certificate,
falls back to dialback on failure.

Same shape as the other feature modules: `offer` (receiver), `choose`
(initiator: the ``<auth/>`` to send, or None; the session sends it and moves
to `Stage.SASL`) and `HANDLERS`. Outcomes go back through the session:
`sasl_succeeded`, `sasl_refused`, `record_sasl_failure`.
"""

from __future__ import annotations

import base64
import binascii

from router.trust import policy as pol
from router.wire.jid import normalize_domain
from router.wire.namespaces import SASL_NS
from router.negotiation.features import Advertised, Offer
from router.negotiation.state import SASL, Negotiator
from router.wire.xml import first_condition, text_node

EXTERNAL = "EXTERNAL"
# RFC 6120 §6.5: conditions a <failure/> may carry; anything else means not-authorized.
FAILURE_CONDITIONS = frozenset(
    {
        "aborted", "account-disabled", "credentials-expired", "encryption-required", "incorrect-encoding",
        "invalid-authzid", "invalid-mechanism", "malformed-request", "mechanism-too-weak", "not-authorized",
        "temporary-auth-failure",
    }
)


def offer(s: Negotiator) -> Offer | None:
    """``<mechanisms><mechanism>EXTERNAL</mechanism></mechanisms>`` when the certificate proves `from`."""
    if not s.encrypted or s.authenticated or s.remote_domain is None or not s.peer_certificate_ok(s.remote_domain):
        return None
    if not pol.auth_mechanism_allowed(s.config.policy, s.remote_domain, pol.MECHANISM_EXTERNAL, True):
        return None
    return Offer("mechanisms", SASL_NS, children="<mechanism>EXTERNAL</mechanism>", required=True)


def choose(s: Negotiator, adv: Advertised) -> bytes | None:
    """Initiator: try EXTERNAL first when offered and we present a certificate (§6.3.4)."""
    if EXTERNAL not in adv.mechanisms or not s.config.has_certificate or s.sasl_tried or not s.encrypted:
        return None
    authzid = base64.b64encode(s.local_domain.encode()).decode() if s.config.sasl_send_authzid else "="
    return f"<auth xmlns='{SASL_NS}' mechanism='EXTERNAL'>{authzid}</auth>".encode()


def _failure(s: Negotiator, condition: str, text: str) -> None:
    s.send(f"<failure xmlns='{SASL_NS}'><{condition}/><text xml:lang='en'>{text_node(text)}</text></failure>".encode())
    failures = s.record_sasl_failure()
    if failures > s.config.sasl_max_failures:
        s.close("policy-violation", f"too many failed SASL attempts ({failures})")


def decode_authzid(data: str) -> str | None:
    """The authzid of an EXTERNAL initial response; '' for none (``=``). ValueError if malformed (§6.3.5)."""
    # RFC 6120 §6.3.5 wants plain base64, but XEP-0288 Example 3 indents it: XML whitespace is tolerated
    data = "".join(data.split())
    if data == "=":
        return ""
    if not data:
        raise ValueError("empty initial response (a zero-length response is sent as '=')")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("initial response is not base64 (RFC 4648 §4)") from None
    if base64.b64encode(raw).decode("ascii") != data:
        raise ValueError("initial response has non-zero padding bits")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("authzid is not UTF-8") from None


def handle_auth(s: Negotiator, element) -> None:
    """Receiver: ``<auth mechanism='EXTERNAL'>`` -> ``<success/>`` (restart) or ``<failure/>``."""
    if s.role != "receiver":
        s.close("unsupported-stanza-type", "<auth/> sent to the initiating server")
        return
    tree = s.tree(element)
    mechanism = tree.get("mechanism")
    if mechanism != EXTERNAL or s.authenticated or s.remote_domain is None:
        _failure(s, "invalid-mechanism", f"mechanism {mechanism!r} is not available on this stream")
        return
    if not s.encrypted:
        _failure(s, "encryption-required", "EXTERNAL needs the certificate of a TLS-protected stream")
        return
    try:
        authzid = decode_authzid(tree.text or "")
    except ValueError as exc:
        _failure(s, "malformed-request", str(exc))
        return
    domain = s.remote_domain
    if authzid:
        try:
            same = normalize_domain(authzid) == domain
        except ValueError:
            same = False
        if not same:
            _failure(s, "invalid-authzid", f"{authzid!r} is not the domain {domain} you authenticate as")
            return
    decision = pol.auth_mechanism_allowed(s.config.policy, domain, pol.MECHANISM_EXTERNAL, s.encrypted)
    if not decision:
        _failure(s, "not-authorized", decision.text)
        return
    if not s.peer_certificate_ok(domain):
        _failure(s, "not-authorized", f"the certificate does not prove {domain}")
        return
    s.send(f"<success xmlns='{SASL_NS}'/>".encode())
    s.sasl_succeeded(element.end)


def handle_abort(s: Negotiator, element) -> None:
    """Receiver: ``<abort/>`` -> ``<failure><aborted/></failure>`` (§6.4.4)."""
    if s.role != "receiver":
        s.close("unsupported-stanza-type", "<abort/> sent to the initiating server")
        return
    _failure(s, "aborted", "authentication aborted by the initiating server")


def handle_response(s: Negotiator, element) -> None:
    """Receiver: EXTERNAL has no challenges, so any ``<response/>`` is out of place."""
    if s.role != "receiver":
        s.close("unsupported-stanza-type", "<response/> sent to the initiating server")
        return
    _failure(s, "malformed-request", "EXTERNAL sends no challenges; <response/> is unexpected")


def handle_success(s: Negotiator, element) -> None:
    """Initiator: restart the stream (re-feeding whatever followed ``<success/>``)."""
    if s.role != "initiator" or s.stage is not SASL:
        s.close("unsupported-stanza-type", "<success/> without an <auth/> request")
        return
    s.sasl_succeeded(element.end)


def handle_failure(s: Negotiator, element) -> None:
    """Initiator: EXTERNAL refused; continue with dialback if the peer offers it."""
    if s.role != "initiator" or s.stage is not SASL:
        s.close("unsupported-stanza-type", "SASL <failure/> without an <auth/> request")
        return
    condition = first_condition(s.tree(element), SASL_NS)
    s.sasl_refused(condition if condition in FAILURE_CONDITIONS else "not-authorized")


HANDLERS = {
    (SASL_NS, "auth"): handle_auth,
    (SASL_NS, "abort"): handle_abort,
    (SASL_NS, "response"): handle_response,
    (SASL_NS, "success"): handle_success,
    (SASL_NS, "failure"): handle_failure,
}
