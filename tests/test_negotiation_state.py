"""The negotiation stages and their transition table (router.negotiation.state), and the layout of the
package around it: no import cycle, feature modules that report instead of assigning session state,
and the pure decisions of `negotiate` and `headers`."""

from __future__ import annotations

import ast
import pathlib
from types import SimpleNamespace

import pytest

from router.trust import pki
from router.negotiation import authorization, headers, negotiate, opening
from router.negotiation.features import Advertised
from router.negotiation.session import Session
from router.negotiation.state import TRANSITIONS, Negotiator, Stage, StageError, advance, first_stage
from router.trust.policy import Policy
from test_negotiation_support import Wire, config, pki_world  # noqa: F401
from test_negotiation_stream import header

PACKAGE = pathlib.Path(authorization.__file__).parent
FEATURE_MODULES = ("tls", "sasl", "dialback", "bidi")
ROLE_STAGES = {
    "receiver": {Stage.TLS, Stage.HEADER, Stage.OPEN, Stage.CLOSED},
    "initiator": set(Stage) - {Stage.OPEN},
}


class Recording(Session):
    """A session that records each stage it moves to (a subclass: the moves still go through the table)."""

    def __init__(self, *args, **kwargs):
        self.moves = []
        super().__init__(*args, **kwargs)
        self.moves.insert(0, self.stage)

    def _advance(self, stage):
        super()._advance(stage)
        self.moves.append(self.stage)


# ---------------------------------------------------------------- the table


@pytest.mark.parametrize("role", sorted(TRANSITIONS))
def test_table_lists_every_stage_of_the_role_and_every_one_can_close(role):
    table = TRANSITIONS[role]
    assert set(table) == ROLE_STAGES[role]
    for stage, moves in table.items():
        assert set(moves) <= ROLE_STAGES[role], stage
        assert all(isinstance(why, str) and why for why in moves.values())
        if stage is not Stage.CLOSED:
            assert Stage.CLOSED in moves, f"{stage} cannot end"
    assert table[Stage.CLOSED] == {}


@pytest.mark.parametrize("role", sorted(TRANSITIONS))
def test_every_stage_is_reachable_from_a_first_stage(role):
    table = TRANSITIONS[role]
    seen, todo = set(), [first_stage(False), first_stage(True)]
    while todo:
        stage = todo.pop()
        if stage not in seen:
            seen.add(stage)
            todo.extend(table[stage])
    assert seen == set(table)


@pytest.mark.parametrize(
    "role, current, new",
    [
        ("receiver", Stage.HEADER, Stage.TLS),  # <proceed/> only after our features
        ("receiver", Stage.OPEN, Stage.FEATURES),  # an initiator's stage
        ("receiver", Stage.FEATURES, Stage.CLOSED),  # not a receiver's stage at all
        ("initiator", Stage.HEADER, Stage.STARTTLS),  # features first
        ("initiator", Stage.DIALBACK, Stage.HEADER),  # no restart once negotiated
        ("initiator", Stage.SASL_ONLY, Stage.DIALBACK),
        ("initiator", Stage.CLOSED, Stage.HEADER),  # nothing leaves CLOSED
        ("receiver", Stage.CLOSED, Stage.CLOSED),
    ],
)
def test_an_illegal_transition_raises(role, current, new):
    with pytest.raises(StageError, match=f"{current.name} to {new.name}"):
        advance(role, current, new)


def test_module_names_are_the_stage_members():
    from router.negotiation import state

    assert all(getattr(state, stage.name) is stage for stage in Stage)


def test_a_legal_transition_returns_the_new_stage():
    assert advance("initiator", Stage.SASL, Stage.FEATURES) is Stage.FEATURES
    assert advance("receiver", Stage.OPEN, Stage.TLS) is Stage.TLS


def test_the_session_refuses_a_move_the_table_does_not_allow():
    session = Session("receiver", config(["b.example"]))
    with pytest.raises(StageError):
        session._advance(Stage.DIALBACK)
    assert session.stage is Stage.HEADER


def test_an_illegal_move_inside_a_handler_closes_the_stream_instead_of_escaping(monkeypatch):
    """A bug that tries an illegal move is an internal error of that stream only."""
    monkeypatch.setattr(negotiate, "next_step", lambda s, adv: negotiate.Step(Stage.OPEN))
    session = Session("initiator", config(["a.example"]), "a.example", "b.example")
    session.receive_data(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' "
                         b"id='r1' from='b.example' version='1.0'><stream:features/>")
    assert [e.condition for e in session.events() if type(e).__name__ == "Closed"] == ["internal-server-error"]
    assert session.stage is Stage.CLOSED


# ---------------------------------------------------------------- stages a session goes through


def test_stages_of_starttls_then_sasl_external_then_dialback_ready(pki_world):
    ca, _ = pki_world
    chains = {d: (pki.make_leaf(ca, d).cert_der(),) for d in ("a.example", "b.example")}
    initiator = Recording("initiator", config(["a.example"], trust=[ca]), "a.example", "b.example")
    receiver = Recording("receiver", config(["b.example"], trust=[ca]))
    Wire(initiator, receiver, chains["a.example"], chains["b.example"]).pump()
    assert receiver.moves == [Stage.HEADER, Stage.OPEN, Stage.TLS, Stage.HEADER, Stage.OPEN, Stage.HEADER, Stage.OPEN]
    assert initiator.moves == [Stage.HEADER, Stage.FEATURES, Stage.STARTTLS, Stage.TLS, Stage.HEADER, Stage.FEATURES,
                               Stage.SASL, Stage.HEADER, Stage.FEATURES, Stage.DIALBACK]
    assert initiator.outbound_pairs == (("a.example", "b.example"),) and receiver.sasl_done


def test_stages_when_sasl_is_refused_and_the_peer_has_no_dialback():
    session = Recording("initiator", config(["a.example"]), "a.example", "b.example")
    response = (b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' id='%s' "
                b"from='b.example' version='1.0'>")
    session.receive_data(response % b"r1" + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
                                            b"</stream:features><proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    session.tls_established(())
    session.receive_data(response % b"r2" + b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                                            b"<mechanism>EXTERNAL</mechanism></mechanisms></stream:features>")
    assert session.stage is Stage.SASL
    session.receive_data(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>")
    assert session.moves == [Stage.HEADER, Stage.FEATURES, Stage.STARTTLS, Stage.TLS, Stage.HEADER, Stage.FEATURES,
                             Stage.SASL, Stage.FEATURES, Stage.CLOSED]
    assert session.sasl_condition == "not-authorized" and session.closed


def test_stages_of_plain_dialback_and_of_a_graceful_close():
    initiator = Recording("initiator", config(["a.example"], tls_client=False), "a.example", "b.example")
    receiver = Recording("receiver", config(["b.example"], tls_offered=False))
    Wire(initiator, receiver).pump()
    assert initiator.moves == [Stage.HEADER, Stage.FEATURES, Stage.DIALBACK]
    assert receiver.moves == [Stage.HEADER, Stage.OPEN]
    receiver.close()  # graceful: our </stream:stream> is out, input is still read (RFC 6120 §4.4)
    assert receiver.closed and receiver.stage is Stage.OPEN
    receiver.receive_data(b"</stream:stream>")
    assert receiver.stage is Stage.CLOSED


def test_direct_tls_starts_in_the_tls_stage_and_refuses_early_data():
    session = Recording("receiver", config(["b.example"]), direct_tls=True)
    assert session.stage is Stage.TLS
    session.receive_data(header())
    assert session.moves == [Stage.TLS, Stage.CLOSED]


def test_a_second_initial_header_after_sasl_must_keep_the_domains(pki_world):
    """The stage is HEADER again after <success/>; the restarted header is checked like the first."""
    ca, _ = pki_world
    session = Recording("receiver", config(["b.example"], trust=[ca], policy=Policy(require_encryption=True)))
    session.receive_data(header() + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    session.tls_established((pki.make_leaf(ca, "a.example").cert_der(),))
    session.receive_data(header() + b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
    assert session.stage is Stage.HEADER and session.sasl_done
    session.receive_data(header(from_="c.example"))
    assert session.moves[-2:] == [Stage.HEADER, Stage.CLOSED]


# ---------------------------------------------------------------- package layout


def _imports(path: pathlib.Path) -> set[str]:
    """Every module a file imports, TYPE_CHECKING blocks and function bodies included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _package_graph() -> dict[str, set[str]]:
    names = {path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    graph = {}
    for name in names:
        imported = _imports(PACKAGE / f"{name}.py")
        graph[name] = {other for other in names if f"router.negotiation.{other}" in imported and other != name}
    return graph


def test_no_import_cycle_inside_the_negotiation_package():
    graph = _package_graph()
    state: dict[str, str] = {}

    def visit(name, path):
        state[name] = "open"
        for other in graph[name]:
            assert state.get(other) != "open", f"import cycle: {' -> '.join(path + [other])}"
            if other not in state:
                visit(other, path + [other])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_feature_modules_import_neither_the_session_nor_its_mixins():
    graph = _package_graph()
    for name in (*FEATURE_MODULES, "negotiate", "headers", "state", "features", "events", "pairs", "config"):
        assert not graph[name] & {"session", "opening", "authorization"}, name


@pytest.mark.parametrize("name", FEATURE_MODULES)
def test_feature_modules_never_assign_session_attributes(name):
    """They read the `Negotiator` and act through its methods: no ``s.x = ...``, ``s.x += ...``, ``del s.x[...]``."""

    def rooted_at_s(target) -> bool:
        while isinstance(target, (ast.Attribute, ast.Subscript)):
            target = target.value
        return isinstance(target, ast.Name) and target.id == "s"

    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        bad = [t for t in targets if isinstance(t, (ast.Attribute, ast.Subscript)) and rooted_at_s(t)]
        assert not bad, f"{name}.py line {node.lineno} assigns {ast.unparse(bad[0])}"


def test_every_module_says_its_one_job_first():
    for path in PACKAGE.glob("*.py"):
        assert ast.get_docstring(ast.parse(path.read_text())), path.name


@pytest.mark.parametrize("mixin", [opening, authorization])
def test_the_session_provides_what_its_mixins_rely_on(mixin):
    session = Session("initiator", config(["a.example"]), "a.example", "b.example")
    for part in mixin._SESSION_PARTS:
        assert hasattr(session, part), f"{mixin.__name__} needs Session.{part}"
    assert not hasattr(session, "__dict__")


def test_the_session_is_a_negotiator():
    """Every property and method feature modules may use exists on a real session."""
    members = [name for name in vars(Negotiator) if not name.startswith("_")]
    assert {"stage", "send", "close", "accept_inbound", "verify_answered"} <= set(members)
    for role, args in (("initiator", ("a.example", "b.example")), ("receiver", ())):
        session = Session(role, config(["a.example"]), *args)
        missing = [name for name in members if not hasattr(session, name)]
        assert not missing, f"{role} session lacks {missing}"


# ---------------------------------------------------------------- pure decisions


def negotiator(**overrides):
    """A read-only stand-in for the session, as `negotiate.next_step` sees it."""
    base = dict(
        sasl_done=False, encrypted=False, verify_only=False, bidi=False, authenticated=False, sasl_tried=False,
        sasl_condition=None, remote_domain="b.example", local_domain="a.example", peer_declares_dialback=True,
        advertised=None, config=config(["a.example"], bidi="always"), tls_required=lambda: False,
    )
    base.update(overrides)
    return SimpleNamespace(**base)


@pytest.mark.parametrize(
    "state, adv, stage, condition",
    [
        ({}, Advertised(starttls=True), Stage.STARTTLS, None),
        ({"encrypted": True}, Advertised(mechanisms=("EXTERNAL",), dialback=True), Stage.SASL, None),
        ({"encrypted": True, "sasl_tried": True}, Advertised(mechanisms=("EXTERNAL",), dialback=True), Stage.DIALBACK, None),
        ({"sasl_done": True}, Advertised(), Stage.DIALBACK, None),
        ({"sasl_done": True}, Advertised(required=frozenset({"{urn:x}foo"})), Stage.CLOSED, "unsupported-feature"),
        ({}, Advertised(starttls=True, starttls_required=True), Stage.STARTTLS, None),
        ({"tls_required": lambda: True}, Advertised(dialback=True), Stage.CLOSED, "policy-violation"),
        ({"peer_declares_dialback": False}, Advertised(), Stage.CLOSED, "unsupported-feature"),
        ({"peer_declares_dialback": False, "sasl_condition": "not-authorized"}, Advertised(), Stage.CLOSED,
         "policy-violation"),
    ],
)
def test_next_step_follows_xep_0170_order(state, adv, stage, condition):
    step = negotiate.next_step(negotiator(advertised=adv, **state), adv)
    assert (step.stage, step.condition) == (stage, condition)


def test_next_step_pipelines_the_bidi_request_before_authentication():
    adv = Advertised(dialback=True, bidi=True)
    step = negotiate.next_step(negotiator(advertised=adv), adv)
    assert step.stage is Stage.DIALBACK and step.bidi == b"<bidi xmlns='urn:xmpp:bidi'/>"
    step = negotiate.next_step(negotiator(advertised=adv, verify_only=True), adv)
    assert step.bidi is None


def _header(to="b.example", from_="a.example"):
    return SimpleNamespace(to=to, from_=from_)


@pytest.mark.parametrize(
    "header_, sasl_done, known, expected",
    [
        (_header(), False, (None, None), ("b.example", "a.example", None)),
        (_header(to="x.example"), False, (None, None), (None, None, "host-unknown")),
        (_header(to=None), False, (None, None), (None, None, "host-unknown")),
        (_header(from_="bad..name"), False, (None, None), ("b.example", None, "invalid-from")),
        (_header(from_="c.example"), True, ("b.example", "a.example"), ("b.example", "a.example", "invalid-from")),
        (_header(from_="denied.example"), False, (None, None), ("b.example", "denied.example", "policy-violation")),
    ],
)
def test_initial_addresses(header_, sasl_done, known, expected):
    cfg = config(["b.example"], policy=Policy(require_encryption=False, deny=("denied.example",)))
    local, remote, refusal = headers.initial_addresses(header_, cfg, sasl_done, *known)
    assert (local, remote, refusal and refusal[0]) == expected
