"""The fault engine: the faults in force, in the order they were added, judged frame by frame.

Each fault is compiled once into a flat tuple of steps; `decide` walks every fault for a
frame. How faults compose (the README's "Several faults"): a frame meets the faults in the
order they were added. A fault that does not act lets the frame go on to the next. One that
acts either adds to what happens to the frame and lets the walk go on (delay, duplicate,
throttle, slice, slow_close, limit, cancel, connect_delay: delays add up, copies add up, the
shaping of the direction is installed in order), or ends it (allow, drop, error, kill,
reset, killall, hang): the faults after it do not see the frame. What ends the walk happens
after the holds: a delay then a kill waits, then kills.

Fault-level steps (`where`, `connectionProbability`, `times`, `fromClient`/`fromServer`) are
taken out of the chain when it is compiled: they do not depend on where they are written.
Per-connection state of a fault (its `after` counters, whether `where` matched) is keyed by
the id of the installed fault, so a replaced fault starts fresh everywhere without touching
other connections' objects.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from wirefault.protocols import Frame, FrameBatch, FrameRun, ProtocolSpec
from wirefault.protocols.base import BACKEND, FRONTEND, ConnectionAgent, MessageSpec
from wirefault.protocols.batch import TypeTable, texts_pass

from . import dsl, faults
from .faults import (
    ENDS_THE_WALK,
    FORWARD,
    KILL,
    ConnectionState,
    Decision,
    Fault,
    FaultConnectionState,
    SharedState,
    Verdict,
    chance,
)
from .faults.base import frame_number
from .faults.cancel import protected_pids
from .user_regex import UserPattern, literal_form

logger = logging.getLogger("wirefault")

DEFAULT_RULE = "conn.allow()"
CONN_FAULT_NAME = "conn"
FIRED_LOG_SIZE = 10_000
"""Firings kept in memory (the newest), for the control plane's event log."""

_FILTER, _DERIVED, _MATCH, _CONTAINS, _AFTER, _PROBABILITY = range(6)

Step = tuple[int, object, object]

WholeTests = tuple[tuple, tuple[bytes, ...]]
"""`passes_whole`'s tests for a direction's frames of one type table: (by_code, needles).
`by_code`: `texts_pass`'s tests by type byte (None: no fault may act on such a frame; a
tuple: the text tests a frame must pass; False: it must be judged), or `NOTHING_GATED` or
`UNTESTABLE`. `needles`: bytes none of which may occur in the read (the contains() a fault
stops at on every frame of a read without them)."""
NOTHING_GATED: tuple = ()
"""`WholeTests`: no frame of the table's types has a fault to walk."""
UNTESTABLE: tuple = (False,)
"""`WholeTests`: every frame must be judged by `first_fault`."""
_STOPS, _UNDECIDED, _MUST_JUDGE = object(), object(), object()
MAX_WHOLE_TESTS_KEYS = 4096
"""`WholeTests` the engine keeps (one per connection and direction when a fault has a
where() or connectionProbability())."""

MAX_CANDIDATE_KEYS = 512
"""(direction, type, alias) keys `decide` remembers the candidate faults of."""
_SIDE_EFFECT_FREE = (dsl.MessageFilter, dsl.BytesMatch, dsl.BytesContains, dsl.FromSide,
                     dsl.Where, dsl.Times, dsl.ConnectionProbability)
"""Steps that change nothing when they stop a frame (after() and probability() count or
draw)."""


@dataclass(slots=True)
class InstalledFault:
    """One fault in force: its compiled chain, its action and what it has done."""

    uid: int
    name: str
    text: str
    added: float
    """Wall-clock time it was added (seconds since the epoch)."""
    steps: tuple[Step, ...]
    after_nodes: int
    fault: Fault
    action: str
    shared: SharedState
    from_client: bool | None
    """fromClient() / fromServer(); None: both directions."""
    times: int | None
    where: tuple[tuple[str, UserPattern], ...]
    connection_probability: float | None
    gate: frozenset[str] | None
    """When the chain starts with side-effect-free steps and a message filter, the type it names: a
    frame of another type is forwarded with no side effect, so runs of frames none of which
    has that type need no decision (see `first_fault`)."""
    spent: bool = False

    @property
    def connection_level(self) -> bool:
        return bool(self.where) or self.connection_probability is not None


@dataclass(frozen=True, slots=True)
class Firing:
    """One time a fault acted: what `faults.list()` counts and the fired log keeps."""

    time: float
    fault: str
    connection: int
    client: str
    frame: str
    action: str

    def line(self) -> str:
        return (f"fired fault={self.fault} conn={self.connection} client={self.client} "
                f"frame={self.frame} action={self.action}")


@dataclass(slots=True)
class Judgement:
    """What the faults in force decided for one frame that at least one acted on."""

    end: Decision = FORWARD
    """What ends the walk (FORWARD: the frame goes out, after any holds)."""
    end_fault: int = 0
    """The id of the fault that ended the walk (hang() is lifted when it is removed)."""
    hold: float = 0.0
    """Seconds the frame and its direction wait first."""
    pause: float = 0.0
    """Seconds the whole proxy waits first (cancel(pid))."""
    copies: int = 0
    shaping: list[Decision] = field(default_factory=list)
    """Throttle, slice, slow_close, limit and cancel decisions, in the order they fired."""
    fired: list[tuple[str, str]] = field(default_factory=list)
    """(fault name, action) of every fault that acted, in order."""

    def after_holds(self) -> Judgement:
        """The rest of the judgement, once the frame has waited its holds."""
        return Judgement(self.end, self.end_fault, 0.0, 0.0, self.copies,
                         [d for d in self.shaping if d.verdict is Verdict.SLICE], self.fired)


def _compile_steps(rule: dsl.Rule, protocol: ProtocolSpec) -> tuple[tuple[Step, ...], int]:
    steps: list[Step] = []
    after_nodes = 0
    for step in rule.steps:
        if isinstance(step, dsl.MessageFilter):
            derived = protocol.derived_fields.get(step.type, ())
            own = tuple((n, p) for n, p in step.fields if n not in derived)
            extra = tuple((n, p) for n, p in step.fields if n in derived)
            steps.append((_FILTER, step.type, own))
            if extra:
                steps.append((_DERIVED, extra, None))
        elif isinstance(step, dsl.BytesMatch):
            steps.append((_MATCH, step.pattern, None))
        elif isinstance(step, dsl.BytesContains):
            steps.append((_CONTAINS, step.needle, None))
        elif isinstance(step, dsl.After):
            steps.append((_AFTER, after_nodes, step.count))
            after_nodes += 1
        elif isinstance(step, dsl.Probability):
            steps.append((_PROBABILITY, len(steps), step.p))
        # FromSide, Times, Where, ConnectionProbability: fault-level, see `install`.
    return tuple(steps), after_nodes


def _gate(rule: dsl.Rule) -> frozenset[str] | None:
    for step in rule.steps:
        if isinstance(step, dsl.MessageFilter):
            return frozenset({step.type})
        if not isinstance(step, _SIDE_EFFECT_FREE):
            return None
    return None


def _whole_test(f: InstalledFault, spec: MessageSpec, conn: ConnectionState | None
                ) -> object:
    """How a read shows that `f` stops, with no side effect, at a step of its chain on
    every frame of this (plain) type: `_STOPS` (it filters another type, or its where()
    or connectionProbability() left this connection out), bytes (a contains() the read
    lacks), a pattern (a filter on the type's sole text field that finds nothing);
    `_UNDECIDED` (conn: a where() still undecided) or `_MUST_JUDGE` otherwise. Steps
    before the one found are side-effect free (filters, match(), contains())."""
    if f.connection_level:
        state = conn.faults.get(f.uid) if conn is not None else None
        if state is None or state.enabled is None:
            return _UNDECIDED if conn is not None else _MUST_JUDGE
        if state.enabled is False:
            return _STOPS
    sole = spec.sole_text
    for kind, a, b in f.steps:
        if kind == _FILTER:
            if a != spec.name:  # a plain frame has no alias
                return _STOPS
            if b and sole is not None and len(b) == 1 and b[0][0] == sole[0]:  # type: ignore[arg-type,index]
                return b[0][1]  # type: ignore[index]
        elif kind == _CONTAINS:
            return a
        elif kind != _DERIVED and kind != _MATCH:
            break  # after() counts, probability() draws
    return _MUST_JUDGE


def _fields_match(frame: Frame, fields: tuple[tuple[str, UserPattern], ...]) -> bool:
    for name, pattern in fields:
        text = frame.field_text(name)
        if text is None or pattern.search(text) is None:
            return False
    return True


def _derived_match(frame: Frame, fields: tuple[tuple[str, UserPattern], ...],
                   conn: ConnectionState) -> bool:
    agent = conn.agent
    if agent is None:
        return False
    for name, pattern in fields:
        text = agent.derived_field(frame, name)
        if text is None or pattern.search(text) is None:
            return False
    return True


class RuleEngine:
    """Holds the faults in force for one proxy and decides each frame's fate."""

    def __init__(self, protocol: ProtocolSpec, initial: str | None = None,
                 seed: int = 0, clock: Callable[[], float] = time.time) -> None:
        self.protocol = protocol
        self.seed = seed
        self.clock = clock
        self.faults: list[InstalledFault] = []
        self.fired_total = 0
        self.fired_log: deque[Firing] = deque(maxlen=FIRED_LOG_SIZE)
        self.on_fired: Callable[[Firing], None] | None = None
        """Called with each Firing (the HTTP API's event log); None: nobody listens."""
        self.tracks_statements = False
        """Sticky: once a fault read a derived field, connections keep tracking them."""
        self._next_uid = 0
        self._gates: tuple[frozenset[str] | None, frozenset[str] | None] = (None, None)
        self._killall_on = False
        self._per_connection = False
        """A live fault has a where() or connectionProbability(): whole-read tests are
        worked out per connection."""
        self._live: list[InstalledFault] = []
        self._candidates: dict[tuple[bool, str, str | None], list[InstalledFault]] = {}
        """`_candidates_for`'s answers, until what is in force changes."""
        self._whole_tests: dict[int, WholeTests] = {}
        """`_whole_tests_for`'s answers by `whole_tests_key`, until what is in force
        changes."""
        if initial:
            self.set_rule_text(initial)

    # -- changing what is in force ---------------------------------------------------------

    def parse(self, text: str) -> dsl.Command:
        """Parse a command for this proxy (cancel(pid) refuses the proxy's own processes)."""
        return dsl.parse(text, self.protocol, protected_pids())

    def set_rule_text(self, text: str) -> None:
        """Parse a conn.* or faults.add command and apply it; on a CommandError what was in
        force stays."""
        parsed = self.parse(text)
        if isinstance(parsed, dsl.Rule):
            self.install(parsed)
        elif isinstance(parsed, dsl.FaultCommand) and parsed.op == "add":
            assert parsed.rule is not None and parsed.name is not None
            self.add(parsed.name, parsed.rule, parsed.seed)
        else:
            raise dsl.CommandError("expected a conn.* or faults.add(...) command", 1)

    def install(self, rule: dsl.Rule) -> None:
        """A conn.* command: this fault replaces every fault (conn.allow() clears them)."""
        self.faults = []
        if rule.action.name != "allow" or rule.steps:
            self.faults.append(self._compile(CONN_FAULT_NAME, rule, None))
        self._changed()

    def add(self, name: str, rule: dsl.Rule, seed: int | None = None) -> InstalledFault:
        """Add a named fault at the end, or in place of the fault of that name (its state
        starts fresh)."""
        installed = self._compile(name, rule, seed)
        for index, existing in enumerate(self.faults):
            if existing.name == name:
                self.faults[index] = installed
                break
        else:
            self.faults.append(installed)
        self._changed()
        return installed

    def remove(self, name: str) -> bool:
        kept = [f for f in self.faults if f.name != name]
        if len(kept) == len(self.faults):
            return False
        self.faults = kept
        self._changed()
        return True

    def clear(self) -> None:
        self.faults = []
        self._changed()

    def in_force(self, uid: int) -> bool:
        """The fault is still listed: a spent fault too (times(n) used up), so that its
        hang() lasts until it is removed, as faults.remove() promises."""
        return any(f.uid == uid for f in self.faults)

    def names(self) -> list[str]:
        return [f.name for f in self.faults]

    @property
    def rule_text(self) -> str:
        """What is in force, for logs: the commands, or conn.allow() when nothing is."""
        return "; ".join(f.text for f in self.faults) or DEFAULT_RULE

    def _compile(self, name: str, rule: dsl.Rule, seed: int | None) -> InstalledFault:
        self._next_uid += 1
        steps, after_nodes = _compile_steps(rule, self.protocol)
        sides = [s.from_client for s in rule.steps if isinstance(s, dsl.FromSide)]
        times = [s.count for s in rule.steps if isinstance(s, dsl.Times)]
        where = tuple(pair for s in rule.steps if isinstance(s, dsl.Where) for pair in s.fields)
        chances = [s.p for s in rule.steps if isinstance(s, dsl.ConnectionProbability)]
        derived = any(kind == _DERIVED for kind, _, _ in steps)
        if derived:
            self.tracks_statements = True
        return InstalledFault(
            uid=self._next_uid, name=name, text=rule.text, added=self.clock(),
            steps=steps, after_nodes=after_nodes, fault=faults.build(rule.action),
            action=rule.action.name,
            shared=SharedState(name=name, seed=self.seed if seed is None else seed),
            from_client=None if not sides or len(set(sides)) > 1 else sides[0],
            times=min(times) if times else None, where=where,
            connection_probability=chances[0] if chances else None,
            gate=_gate(rule),
        )

    def _changed(self) -> None:
        """Recompute what the per-read path consults: the live faults and the gates."""
        self._live = [f for f in self.faults if not f.spent]
        self._candidates.clear()
        self._whole_tests.clear()
        self._killall_on = any(f.shared.killall_fired for f in self._live)
        self._per_connection = any(f.connection_level for f in self._live)
        self._gates = (self._gate_for(True), self._gate_for(False))

    def _candidates_for(self, key: tuple[bool, str, str | None]) -> list[InstalledFault]:
        """The live faults, in order, that may act on a frame of this direction, type and
        alias: a fault whose chain starts with side-effect-free steps and a filter of
        another type would only walk to that filter and stop (see `InstalledFault.gate`)."""
        from_client, type_name, alias = key
        found = [f for f in self._live
                 if (f.from_client is None or f.from_client is from_client)
                 and (f.gate is None or type_name in f.gate or alias in f.gate)]
        if len(self._candidates) >= MAX_CANDIDATE_KEYS:  # bounded, whatever types come
            self._candidates.clear()
        self._candidates[key] = found
        return found

    def _gate_for(self, from_client: bool) -> frozenset[str] | None:
        """The union of the types the live faults for this direction start with; None when
        one of them may act on a frame of any type."""
        types: set[str] = set()
        for f in self._live:
            if f.from_client is not None and f.from_client != from_client:
                continue  # never sees this direction
            if f.gate is None:
                return None
            types |= {t for t in f.gate if self._may_travel(t, from_client)}
        return frozenset(types)

    def _may_travel(self, type_name: str, from_client: bool) -> bool:
        """Whether frames of this type can come from that side (a Query never comes from
        the server: a fault starting with onQuery() costs the server's reads nothing)."""
        spec = self.protocol.messages.get(type_name)
        return spec is None or (FRONTEND if from_client else BACKEND) in spec.directions

    # -- judging ---------------------------------------------------------------------------

    @staticmethod
    def whole_tests_key(table: TypeTable, from_client: bool, skim: bool = False,
                        connection: int | None = None) -> int:
        """The key of `passes_whole`'s tests for a direction's frames named by `table`, with
        a skimming agent's or not, for one connection (by number) or any (None). An int: it
        hashes for free, where a tuple would be hashed on every read."""
        per = 0 if connection is None else connection + 1
        return (per << 20) | (table.index << 2) | (from_client << 1) | skim

    def passes_whole(self, data: bytes, types: bytes, ends: bytes, table: TypeTable,
                     conn: ConnectionState, from_client: bool,
                     skimming: ConnectionAgent | None = None) -> bool:
        """`first_fault` for a read of whole frames of plain types (`types` and `ends` as
        `scan` gives them, named by `table`; plain types have no alias) when no fault can
        act on any of them: True, with the frames counted. False, with nothing counted,
        when one may: the caller then judges the read with `first_fault`. `skimming`: the
        agent watches this side but skims (`ConnectionAgent.skim_tests` join the faults').

        Exact without deciding each frame: each fault that may act on a frame of its type
        stops, with no side effect, at a step the read's `WholeTests` show it fails."""
        if self._live or skimming is not None:
            if self._killall_on:  # set when a killall fires, with no _changed(): ask here
                return False
            key = self.whole_tests_key(table, from_client, skimming is not None,
                                       conn.number if self._per_connection else None)
            tests = self._whole_tests.get(key)
            if tests is None:
                tests = self._whole_tests_for(key, table, from_client, conn, skimming)
            by_code, needles = tests
            for needle in needles:
                if needle in data:
                    return False
            if by_code is not NOTHING_GATED and (
                    by_code is UNTESTABLE or not texts_pass(data, types, ends, by_code)):
                return False
        if from_client:
            conn.client_frames_seen += len(types)
        else:
            conn.server_frames_seen += len(types)
        return True

    def _whole_tests_for(self, key: int, table: TypeTable, from_client: bool,
                         conn: ConnectionState, skimming: ConnectionAgent | None
                         ) -> WholeTests:
        """`passes_whole`'s tests (see `WholeTests`), kept by key unless a fault's where()
        or connectionProbability() is not yet decided on this connection."""
        needles: list[bytes] = []
        by_code: list[object] = [None] * 256
        keep = True
        types = tested = judged = 0
        for code, spec in enumerate(table.specs):
            if spec is None:
                continue
            types += 1
            texts: list[object] = []
            entry: object = None
            candidates = self._candidates.get((from_client, spec.name, None))
            if candidates is None:
                candidates = self._candidates_for((from_client, spec.name, None))
            for f in candidates:
                found = _whole_test(f, spec, conn if self._per_connection else None)
                if found is _UNDECIDED:
                    keep = False
                if found is _UNDECIDED or found is _MUST_JUDGE:
                    entry = False
                    break
                if type(found) is bytes:
                    if found not in needles:
                        needles.append(found)
                elif found is not _STOPS:
                    texts.append(found)
            if entry is None and skimming is not None and spec.name in skimming.skim_tests:
                patterns = skimming.skim_tests[spec.name]
                if patterns is None:
                    entry = False
                else:
                    texts.extend(patterns)
            if entry is None and texts:
                entry = tuple(literal_form(p) or p for p in texts)
            if entry is not None:
                by_code[code] = entry
                tested += 1
                judged += entry is False
        if not tested:
            tests: WholeTests = (NOTHING_GATED, tuple(needles))
        elif judged == types:
            tests = (UNTESTABLE, ())
        else:
            tests = (tuple(by_code), tuple(needles))
        if keep:
            if len(self._whole_tests) >= MAX_WHOLE_TESTS_KEYS:  # per connection: bounded
                self._whole_tests.clear()
            self._whole_tests[key] = tests
        return tests

    def first_fault(self, batch: FrameBatch, conn: ConnectionState, from_client: bool,
                    observe: bool = False) -> tuple[int, Judgement | bytes] | None:
        """Decides a read's frames in order: the index of the first one a fault acts on,
        with the judgement; None when all pass. Counts the frames (as the connection's
        frame numbers) before deciding each, as `decide` expects.

        With `observe`, the connection's agent sees each frame first, while it watches that
        side (it must see a frame after the faults judged the ones before it: a Bind
        changes what the next Execute's query is); when it gives bytes to send in a frame's
        place, that frame's index comes back with the bytes, counted but not judged."""
        if observe:
            return self._first_fault_observed(batch, conn, from_client)
        live = self._live
        if not live:  # the proxy with nothing in force: count, nothing else
            if from_client:
                conn.client_frames_seen += len(batch)
            else:
                conn.server_frames_seen += len(batch)
            return None
        gate = None if self._killall_on else self._gates[0 if from_client else 1]
        decide = self.decide
        index = 0
        for segment in batch.segments:
            if type(segment) is FrameRun:
                if gate is not None:
                    codes = segment.table.codes(gate)
                    if not segment.may_contain(codes):
                        if from_client:
                            conn.client_frames_seen += segment.count
                        else:
                            conn.server_frames_seen += segment.count
                        index += segment.count
                        continue
                    # Only a frame of a gated type can have a fault to walk (a run holds no
                    # alias): the others are counted, not decided.
                    for frame, code in zip(segment.frames(), segment.types, strict=True):
                        if from_client:
                            conn.client_frames_seen += 1
                        else:
                            conn.server_frames_seen += 1
                        if code in codes:
                            judgement = decide(frame, conn)
                            if judgement is not FORWARD:
                                return index, judgement  # type: ignore[return-value]
                        index += 1
                    continue
                frames: list[Frame] = segment.frames()
            else:
                frames = [segment]  # type: ignore[list-item]
            for frame in frames:
                if from_client:
                    conn.client_frames_seen += 1
                else:
                    conn.server_frames_seen += 1
                judgement = decide(frame, conn)
                if judgement is not FORWARD:
                    return index, judgement  # type: ignore[return-value]
                index += 1
        return None

    def _first_fault_observed(self, batch: FrameBatch, conn: ConnectionState,
                              from_client: bool) -> tuple[int, Judgement | bytes] | None:
        agent = conn.agent
        assert agent is not None
        judging = bool(self._live)
        decide = self.decide
        index = 0
        for segment in batch.segments:
            frames = segment.frames() if type(segment) is FrameRun else [segment]
            for frame in frames:  # type: ignore[union-attr]
                if from_client:
                    conn.client_frames_seen += 1
                    watching = agent.watch_client
                else:
                    conn.server_frames_seen += 1
                    watching = agent.watch_server
                if watching:
                    replacement = agent.observe(frame)  # type: ignore[arg-type]
                    if replacement is not None:
                        return index, replacement
                if judging:
                    judgement = decide(frame, conn)  # type: ignore[arg-type]
                    if judgement is not FORWARD:
                        return index, judgement  # type: ignore[return-value]
                index += 1
        return None

    def judge_one(self, frame: Frame, conn: ConnectionState) -> Judgement | Decision:
        """`decide` for a frame taken on its own (counted first)."""
        self._count(conn, frame.from_client, 1)
        return self.decide(frame, conn)

    @staticmethod
    def _count(conn: ConnectionState, from_client: bool, frames: int) -> None:
        if from_client:
            conn.client_frames_seen += frames
        else:
            conn.server_frames_seen += frames

    def decide(self, frame: Frame, conn: ConnectionState) -> Judgement | Decision:
        """FORWARD when no fault acts on the frame, else the `Judgement`.

        Each fault's chain is walked inline (this runs for every frame a gate lets through:
        a call per fault would cost as much as the walk); a step that stops the frame
        breaks out to the next fault."""
        judgement: Judgement | None = None
        from_client = frame.from_client
        states = conn.faults
        if self._killall_on:  # a fault whose killall fired acts on every frame
            candidates = self._live
        else:
            key = (from_client, frame.type, frame.alias)
            candidates = self._candidates.get(key)  # type: ignore[assignment]
            if candidates is None:
                candidates = self._candidates_for(key)
        for f in candidates:
            side = f.from_client
            if side is not None and side is not from_client:
                continue
            state = states.get(f.uid)
            if state is None:
                state = self._state_for(f, conn)
            if state.enabled is not True and (
                    state.enabled is False or not self._enable(f, state, conn)):
                continue
            shared = f.shared
            if shared.killall_fired:
                if judgement is None:
                    judgement = Judgement()
                if self._add(f, KILL, frame, conn, judgement):
                    break
                continue
            for kind, a, b in f.steps:
                if kind == _FILTER:
                    if frame.type != a and frame.alias != a:
                        break
                    if b and not _fields_match(frame, b):  # type: ignore[arg-type]
                        break
                elif kind == _DERIVED:
                    if not _derived_match(frame, a, conn):  # type: ignore[arg-type]
                        break
                elif kind == _MATCH:
                    if a.search(frame.data) is None:  # type: ignore[attr-defined]
                        break
                elif kind == _CONTAINS:
                    if a not in frame.data:  # type: ignore[operator]
                        break
                elif kind == _AFTER:
                    counts = state.after_counts
                    if counts[a] < b:  # type: ignore[index,operator]
                        counts[a] += 1  # type: ignore[index]
                        shared.matched += 1
                        break
                # _PROBABILITY: seeded by (seed, fault, connection, direction, frame)
                elif chance(shared.seed, f.name, a, conn.number, from_client,
                            frame_number(frame, conn)) >= b:  # type: ignore[operator]
                    shared.matched += 1
                    break
            else:  # every step passed (this `else` belongs to the loop over the faults)
                shared.matched += 1
                decision = f.fault.decide(frame, conn, shared)
                if decision.verdict is not Verdict.FORWARD:
                    if judgement is None:
                        judgement = Judgement()
                    if self._add(f, decision, frame, conn, judgement):
                        break
        return FORWARD if judgement is None else judgement

    def _add(self, f: InstalledFault, decision: Decision, frame: Frame,
             conn: ConnectionState, judgement: Judgement) -> bool:
        """Fault `f` acted: count it and add its decision; True when it ends the walk."""
        self._fired(f, frame, conn, judgement)
        verdict = decision.verdict
        if verdict in ENDS_THE_WALK:
            judgement.end = decision
            judgement.end_fault = f.uid
            return True
        if verdict is Verdict.HOLD:
            judgement.hold += decision.delay
        elif verdict is Verdict.PAUSE_PROXY:
            judgement.pause = max(judgement.pause, decision.delay)
        elif verdict is Verdict.DUPLICATE:
            judgement.copies += decision.value
        else:
            judgement.shaping.append(decision)
        return False

    def _state_for(self, f: InstalledFault, conn: ConnectionState) -> FaultConnectionState:
        states = conn.faults
        if len(states) > len(self.faults) + 16:  # forget replaced faults' states
            live = {x.uid for x in self.faults}
            for uid in [uid for uid in states if uid not in live]:
                del states[uid]
        state = FaultConnectionState([0] * f.after_nodes,
                                     None if f.connection_level else True)
        states[f.uid] = state
        return state

    def _enable(self, f: InstalledFault, state: FaultConnectionState,
                conn: ConnectionState) -> bool:
        """Decide once per connection whether where() and connectionProbability() let the
        fault act on it; False for now (undecided) until the startup parameters are in."""
        if f.where:
            agent = conn.agent
            if agent is not None and not agent.started:
                return False
            parameters = agent.parameters() if agent is not None else {}
            for key, pattern in f.where:
                value = conn.client if key == "client" else parameters.get(key)
                if value is None or pattern.search(value) is None:
                    state.enabled = False
                    return False
        if f.connection_probability is not None:
            draw = chance(f.shared.seed, f.name, "connection", conn.number)
            if draw >= f.connection_probability:
                state.enabled = False
                return False
        state.enabled = True
        return True

    def _fired(self, f: InstalledFault, frame: Frame, conn: ConnectionState,
               judgement: Judgement) -> None:
        shared = f.shared
        shared.fired += 1
        self.fired_total += 1
        if f.fault.name == "killall" or shared.killall_fired:
            self._killall_on = True
        if f.times is not None and shared.fired >= f.times:
            f.spent = True
            self._changed()
        judgement.fired.append((f.name, f.action))
        firing = Firing(self.clock(), f.name, conn.number, conn.client, frame.type, f.action)
        self.fired_log.append(firing)
        if self.on_fired is not None:
            self.on_fired(firing)
        if logger.isEnabledFor(logging.INFO):  # the line is built only when it is logged
            logger.info("wirefault: %s", firing.line())

    # -- what is in force, for faults.list() -----------------------------------------------

    def listing(self) -> Iterable[str]:
        for f in self.faults:
            added = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(f.added))
            millis = int((f.added % 1) * 1000)
            yield (f"name={f.name} matched={f.shared.matched} fired={f.shared.fired} "
                   f"added={added}.{millis:03d}Z state={'spent' if f.spent else 'active'} "
                   f"command={f.text}")
