"""The rules engine: the rule in force, evaluated frame by frame.

A parsed command is compiled once into a flat tuple of steps; `decide` walks it for each
frame. Per-connection state (`after` counters) is reset lazily when a connection first sees
a new rule's generation, so replacing the rule never touches other connections' objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from wirefault.protocols import Frame, FrameBatch, FrameRun, ProtocolSpec

from . import dsl, faults
from .faults import FORWARD, KILL, ConnectionState, Decision, Fault, SharedState, Verdict
from .faults.cancel import protected_pids

DEFAULT_RULE = "conn.allow()"

_FILTER, _MATCH, _CONTAINS, _AFTER = range(4)

Step = tuple[int, object, object]


@dataclass(frozen=True, slots=True)
class CompiledRule:
    text: str
    generation: int
    steps: tuple[Step, ...]
    after_nodes: int
    fault: Fault
    shared: SharedState
    passthrough: bool
    """True when no frame can ever be affected (a chain ending in allow())."""
    gate: frozenset[str] | None
    """When the chain starts with a message filter, the type it names: a frame of another
    type is forwarded at the first step, with no side effect, so runs of frames none of
    which has that type need no decision (see `first_fault`)."""


def _compile_step(step: dsl.Step, after_index: int) -> Step:
    if isinstance(step, dsl.MessageFilter):
        return (_FILTER, step.type, step.fields)
    if isinstance(step, dsl.BytesMatch):
        return (_MATCH, step.pattern, None)
    if isinstance(step, dsl.BytesContains):
        return (_CONTAINS, step.needle, None)
    if isinstance(step, dsl.After):
        return (_AFTER, after_index, step.count)
    raise TypeError(f"unknown step {step!r}")


def compile_rule(rule: dsl.Rule, generation: int) -> CompiledRule:
    steps: list[Step] = []
    after_nodes = 0
    for step in rule.steps:
        steps.append(_compile_step(step, after_nodes))
        if isinstance(step, dsl.After):
            after_nodes += 1
    fault = faults.build(rule.action)
    return CompiledRule(
        text=rule.text,
        generation=generation,
        steps=tuple(steps),
        after_nodes=after_nodes,
        fault=fault,
        shared=SharedState(),
        passthrough=rule.action.name == "allow",
        gate=_gate(rule),
    )


def _gate(rule: dsl.Rule) -> frozenset[str] | None:
    first = rule.steps[0] if rule.steps else None
    return frozenset({first.type}) if isinstance(first, dsl.MessageFilter) else None


def _fields_match(frame: Frame, fields: tuple[tuple[str, re.Pattern[str]], ...]) -> bool:
    for name, pattern in fields:
        text = frame.field_text(name)
        if text is None or pattern.search(text) is None:
            return False
    return True


class RuleEngine:
    """Holds the rule in force for one proxy and decides each frame's fate."""

    def __init__(self, protocol: ProtocolSpec, initial: str | None = None) -> None:
        self.protocol = protocol
        self._generation = 0
        self.rule: CompiledRule = self._compile(DEFAULT_RULE)
        if initial:
            self.set_rule_text(initial)

    def parse(self, text: str) -> dsl.Command:
        """Parse a command for this proxy (cancel(pid) refuses the proxy's own processes)."""
        return dsl.parse(text, self.protocol, protected_pids())

    def _compile(self, text: str) -> CompiledRule:
        parsed = self.parse(text)
        if not isinstance(parsed, dsl.Rule):
            raise dsl.CommandError("expected a conn.* rule", 1)
        return self.install(parsed)

    def install(self, rule: dsl.Rule) -> CompiledRule:
        """Make `rule` the rule in force; state starts fresh everywhere."""
        self._generation += 1
        self.rule = compile_rule(rule, self._generation)
        return self.rule

    def set_rule_text(self, text: str) -> CompiledRule:
        """Parse and install; on a CommandError the previous rule stays in force."""
        return self._compile(text)

    def first_fault(self, batch: FrameBatch, conn: ConnectionState, from_client: bool
                    ) -> tuple[int, Decision] | None:
        """Decides a read's frames in order: the index of the first one the rule does not
        simply forward, with its decision; None when all pass. Counts client frames (as
        `conn.client_frames_seen`) before deciding each, as `decide` expects."""
        rule = self.rule
        if rule.passthrough:
            if from_client:
                conn.client_frames_seen += len(batch)
            return None
        gate = rule.gate
        decide = self.decide
        index = 0
        for segment in batch.segments:
            if type(segment) is FrameRun:
                if (gate is not None and not rule.shared.killall_fired
                        and not segment.may_contain(segment.table.codes(gate))):
                    if from_client:
                        conn.client_frames_seen += segment.count
                    index += segment.count
                    continue
                frames: list[Frame] = segment.frames()
            else:
                frames = [segment]  # type: ignore[list-item]
            for frame in frames:
                if from_client:
                    conn.client_frames_seen += 1
                decision = decide(frame, conn)
                if decision is not FORWARD:
                    return index, decision
                index += 1
        return None

    def decide(self, frame: Frame, conn: ConnectionState) -> Decision:
        rule = self.rule
        if rule.passthrough:
            return FORWARD
        if conn.generation != rule.generation:
            conn.generation = rule.generation
            conn.after_counts = [0] * rule.after_nodes
        if rule.shared.killall_fired:
            rule.shared.fired += 1
            return KILL
        for kind, a, b in rule.steps:
            if kind == _FILTER:
                if frame.type != a and frame.alias != a:
                    return FORWARD
                if b and not _fields_match(frame, b):  # type: ignore[arg-type]
                    return FORWARD
            elif kind == _MATCH:
                if a.search(frame.data) is None:  # type: ignore[attr-defined]
                    return FORWARD
            elif kind == _CONTAINS:
                if a not in frame.data:  # type: ignore[operator]
                    return FORWARD
            else:
                counts = conn.after_counts
                if counts[a] < b:  # type: ignore[index,operator]
                    counts[a] += 1  # type: ignore[index]
                    return FORWARD
        decision = rule.fault.decide(frame, conn, rule.shared)
        if decision.verdict is not Verdict.FORWARD:
            rule.shared.fired += 1
        return decision
