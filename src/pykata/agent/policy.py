"""The agent policy: which requests the agent executes.

A policy is a small TOML document (docs/policy.md says why not Rego):

    default = "allow"                    # when no rule matches

    [[rules]]
    name = "exec: only ls and cat"
    methods = ["ExecProcess"]            # RPC names; shell-style wildcards
    decision = "deny"
    unless = { "process.Args[0]" = ["/bin/ls", "/bin/cat"] }

Rules are tried in order; the first whose methods match the call, whose
`when` conditions all hold and whose `unless` conditions do not all hold,
decides. A condition maps a request field path (protobuf field names, dots
for nesting, `[n]` for one element of a repeated field) to wildcard
patterns; a repeated field without an index holds when every element
matches some pattern. Field paths are checked against every request type
a rule names when the policy is loaded, so a typo is an error then, not a
silent non-match later.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from .errors import InvalidArgument, PermissionDenied

log = logging.getLogger("pykata.agent.policy")

DECISIONS = ("allow", "deny")
_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?")


@functools.cache
def requests() -> dict[str, Descriptor]:
    """RPC name -> its request's descriptor. Built when a policy with rules is loaded,
    not at start-up: the API's messages and walking every method cost milliseconds."""
    from ..api import agent_pb2, extensions_pb2, health_pb2

    services: list[ServiceDescriptor] = [
        agent_pb2.DESCRIPTOR.services_by_name["AgentService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        # Its streaming calls are decided on their opening message (fields such as open.port).
        extensions_pb2.DESCRIPTOR.services_by_name["Extensions"],
    ]
    return {m.name: m.input_type for s in services for m in s.methods}


_MISSING = object()


@dataclass(frozen=True)
class Condition:
    path: str
    patterns: tuple[str, ...]

    def holds(self, request: Message) -> bool:
        value = _resolve(request, self.path)
        if value is _MISSING:
            return False
        values = value if isinstance(value, list) else [value]
        return all(any(fnmatch.fnmatchcase(v, p) for p in self.patterns) for v in values)

    def __str__(self) -> str:
        return f"{self.path} in {list(self.patterns)}"


@dataclass(frozen=True)
class Rule:
    name: str
    methods: tuple[str, ...]
    decision: str
    when: tuple[Condition, ...] = ()
    unless: tuple[Condition, ...] = ()

    def names(self, method: str) -> bool:
        return any(fnmatch.fnmatchcase(method, m) for m in self.methods)

    def applies(self, request: Message) -> bool:
        """Whether the rule decides this request (of a method it names)."""
        if not all(c.holds(request) for c in self.when):
            return False
        return not (self.unless and all(c.holds(request) for c in self.unless))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # the deciding rule's name, or "default"


@dataclass
class Policy:
    default: str = "allow"
    rules: list[Rule] = field(default_factory=list)
    source: str = "built-in allow-all"
    #: RPC name -> the rules naming it, in order (wildcards resolved once, at load).
    by_method: dict[str, list[Rule]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # No rules (the built-in allow-all): nothing to look up, and no descriptors walked.
        self.by_method = (
            {rpc: [r for r in self.rules if r.names(rpc)] for rpc in requests()}
            if self.rules
            else {}
        )

    @classmethod
    def parse(cls, text: str, source: str) -> Policy:
        """A policy from its TOML text; InvalidArgument naming what is wrong."""
        import tomllib  # only when a policy is given: rarely at start-up

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"policy {source}: not valid TOML: {exc}") from None
        unknown = set(data) - {"default", "rules"}
        if unknown:
            raise InvalidArgument(f"policy {source}: unknown keys {sorted(unknown)}")
        default = data.get("default", "allow")
        if default not in DECISIONS:
            raise InvalidArgument(
                f"policy {source}: default must be allow or deny, not {default!r}"
            )
        rules = [_rule(source, n, raw) for n, raw in enumerate(data.get("rules", []), 1)]
        return cls(default, rules, source)

    def decide(self, method: str, request: Message) -> Decision:
        for rule in self.by_method.get(method, ()):
            if rule.applies(request):
                return Decision(rule.decision == "allow", rule.name)
        return Decision(self.default == "allow", "default")

    def check(self, method: str, request: Message) -> None:
        """Let the call through, or raise PermissionDenied naming the rule."""
        if self.default == "allow" and not self.by_method.get(method):
            return  # no rule for this method and allowed by default: nothing to log
        decision = self.decide(method, request)
        if decision.allowed:
            log.debug("policy allows", extra={"method": method, "rule": decision.rule})
            return
        log.warning("policy denies", extra={"method": method, "rule": decision.rule})
        raise PermissionDenied(f"{method} denied by policy rule {decision.rule!r} ({self.source})")


def _rule(source: str, number: int, raw: Any) -> Rule:
    where = f"policy {source}: rule {number}"
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where} is not a table")
    unknown = set(raw) - {"name", "methods", "decision", "when", "unless"}
    if unknown:
        raise InvalidArgument(f"{where}: unknown keys {sorted(unknown)}")
    name = str(raw.get("name", f"rule {number}"))
    where = f"policy {source}: rule {name!r}"
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods:
        raise InvalidArgument(f"{where}: methods must be a non-empty list of RPC names")
    matched = sorted({rpc for m in methods for rpc in requests() if fnmatch.fnmatchcase(rpc, m)})
    if not matched:
        raise InvalidArgument(f"{where}: methods {methods} match no RPC")
    decision = raw.get("decision")
    if decision not in DECISIONS:
        raise InvalidArgument(f"{where}: decision must be allow or deny, not {decision!r}")
    conditions = {}
    for kind in ("when", "unless"):
        table = raw.get(kind, {})
        if not isinstance(table, dict):
            raise InvalidArgument(f"{where}: {kind} must be a table of field = [patterns]")
        found = []
        for path, patterns in table.items():
            if isinstance(patterns, str):
                patterns = [patterns]
            for rpc in matched:
                _check_path(requests()[rpc], path, f"{where}: {kind} {path!r} for {rpc}")
            found.append(Condition(path, tuple(str(p) for p in patterns)))
        conditions[kind] = tuple(found)
    return Rule(name, tuple(methods), decision, conditions["when"], conditions["unless"])


def _check_path(descriptor: Any, path: str, where: str) -> None:
    steps = path.split(".")
    for n, step in enumerate(steps):
        match = _STEP.fullmatch(step)
        field_ = descriptor.fields_by_name.get(match.group(1)) if match else None
        if field_ is None:
            known = ", ".join(descriptor.fields_by_name)
            raise InvalidArgument(f"{where}: {descriptor.name} has no field {step!r} ({known})")
        if n < len(steps) - 1:
            if field_.type != FieldDescriptor.TYPE_MESSAGE:
                raise InvalidArgument(f"{where}: {step!r} is not a message")
            descriptor = field_.message_type


def _resolve(message: Any, path: str) -> Any:
    """The value at `path`: a str, a list of str, or _MISSING (no such element)."""
    value = message
    for step in path.split("."):
        match = _STEP.fullmatch(step)
        assert match is not None  # checked at load
        value = getattr(value, match.group(1))
        if match.group(2) is not None:
            index = int(match.group(2))
            if index >= len(value):
                return _MISSING
            value = value[index]
    if isinstance(value, Message):
        return str(value)
    if isinstance(value, (str, bytes, int, float, bool)):
        return _text(value)
    return [_text(v) for v in value]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


class Enforcer:
    """The policy in force; SetPolicy replaces it."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()

    def check(self, method: str, request: Message) -> None:
        self.policy.check(method, request)

    def replace(self, text: str, source: str) -> None:
        self.policy = Policy.parse(text, source)
        log.info(
            "policy set",
            extra={
                "source": source,
                "rules": len(self.policy.rules),
                "default": self.policy.default,
            },
        )

    @classmethod
    def from_file(cls, path: str) -> Enforcer:
        enforcer = cls()
        if path:
            try:
                with open(path) as f:
                    text = f.read()
            except OSError as exc:
                raise InvalidArgument(f"cannot read policy file {path}: {exc.strerror}") from None
            enforcer.replace(text, path)
        return enforcer
