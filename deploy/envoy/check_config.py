#!/usr/bin/env python3
"""Checks deploy/envoy's gateway configs against Envoy's own protos and quotad.toml.

envoy.yaml is parsed into envoy.config.bootstrap.v3.Bootstrap with the protos of the
xds-protos package (unknown fields refused), then held to the validation rules Envoy
declares in those protos (protoc-gen-validate annotations), and its rate limit
descriptors are compared with the [[rls_domains]] table of quotad.toml their domain
names. backend-traffic-policy.yaml (Envoy Gateway) is compared with its own table.

Prints one line per check, "ok" or "FAIL" first, then a count; exits 0 when every
check passed, 1 otherwise (a missing package included). Needs Python 3.11+ (tomllib).

    python3 -m venv /tmp/envoy-venv
    /tmp/envoy-venv/bin/pip install -r deploy/envoy/requirements.txt
    /tmp/envoy-venv/bin/python deploy/envoy/check_config.py
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import pkgutil
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

try:
    import yaml
    from google.protobuf import descriptor_pool, json_format, message_factory
    from envoy.annotations import deprecation_pb2
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from envoy.config.core.v3 import config_source_pb2
    from validate import validate_pb2
except ImportError as error:  # the venv is not the one requirements.txt describes
    print(f"FAIL imports: {error} (pip install -r deploy/envoy/requirements.txt)")
    sys.exit(1)

HERE = Path(__file__).resolve().parent

RATELIMIT_FILTER = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
RATELIMIT_PER_ROUTE = (
    "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute"
)
HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# What quotad accepts in a [[rls_domains]] table (crates/quotad/src/rls/domain.rs), with
# its defaults.
DOMAIN_DEFAULTS = {
    "name": "quotad",
    "schools": [],
    "school_key": "school_id",
    "teacher_key": "teacher_id",
    "service_key": "service_type",
    "service_type": None,
    "event_key": "event_id",
    "model_key": "model",
    "phase_key": "quotad_phase",
    "unknown_slice": "deny",
    "holds": False,
    "hold_ttl_ms": 0,
    "response_headers": False,
}
DOMAIN_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
ID_VALUE = re.compile(r"[a-z0-9_]{1,64}")  # a service type
HEADER_NAME_STRICT = re.compile(r"^:?[0-9a-zA-Z!#$%&'*+\-.^_|~`]+$")
HEADER_VALUE_STRICT = re.compile(r"^[^\u0000-\u0008\u000A-\u001F\u007F]*$")
HEADER_LOOSE = re.compile(r"^[^\u0000\u000A\u000D]*$")


class Report:
    """One line per check; remembers whether any failed."""

    def __init__(self) -> None:
        self.failed = 0
        self.passed = 0

    def check(self, ok: bool, what: str, why: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"ok   {what}")
        else:
            self.failed += 1
            print(f"FAIL {what}: {why}" if why else f"FAIL {what}")
        return ok


# ---------------------------------------------------------------- protos


def type_urls(node) -> set[str]:
    """Every "@type" in a YAML document."""
    found = set()
    if isinstance(node, dict):
        if isinstance(node.get("@type"), str):
            found.add(node["@type"])
        for value in node.values():
            found |= type_urls(value)
    elif isinstance(node, list):
        for value in node:
            found |= type_urls(value)
    return found


def import_type(type_url: str) -> str | None:
    """Imports every module of the message's proto package, so that its Any resolves
    (a message's module is named after its file, not after the message). None: found."""
    full_name = type_url.rsplit("/", 1)[-1]
    package = full_name.rsplit(".", 1)[0]
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        return f"no module {package} ({error})"
    for info in pkgutil.iter_modules(module.__path__):
        if info.name.endswith("_pb2"):
            importlib.import_module(f"{package}.{info.name}")
    try:
        descriptor_pool.Default().FindMessageTypeByName(full_name)
    except KeyError:
        return f"{package} has no message {full_name.rsplit('.', 1)[-1]}"
    return None


def unpack(any_message):
    """The message an Any holds (its module must have been imported)."""
    name = any_message.type_url.rsplit("/", 1)[-1]
    descriptor = descriptor_pool.Default().FindMessageTypeByName(name)
    message = message_factory.GetMessageClass(descriptor)()
    any_message.Unpack(message)
    return message


def rules_of(options, extension):
    return options.Extensions[extension] if options.HasExtension(extension) else None


def is_map(field_descriptor) -> bool:
    message_type = field_descriptor.message_type
    return message_type is not None and message_type.GetOptions().map_entry


def number_problems(value, rules) -> list[str]:
    problems = []
    if rules.HasField("const") and value != rules.const:
        problems.append(f"must be {rules.const}")
    for bound, holds, says in (
        ("lt", lambda b: value < b, "<"),
        ("lte", lambda b: value <= b, "<="),
        ("gt", lambda b: value > b, ">"),
        ("gte", lambda b: value >= b, ">="),
    ):
        if rules.HasField(bound) and not holds(getattr(rules, bound)):
            problems.append(f"is {value}, must be {says} {getattr(rules, bound)}")
    allowed = list(getattr(rules, "in"))
    if allowed and value not in allowed:
        problems.append(f"is {value}, must be one of {allowed}")
    return problems


def string_problems(value: str, rules) -> list[str]:
    if rules.ignore_empty and value == "":
        return []
    problems = []
    checks = (
        ("const", lambda r: value == r.const, lambda r: f"must be {r.const!r}"),
        ("len", lambda r: len(value) == r.len, lambda r: f"must be {r.len} characters"),
        ("min_len", lambda r: len(value) >= r.min_len, lambda r: f"needs {r.min_len}+ characters"),
        ("max_len", lambda r: len(value) <= r.max_len, lambda r: f"at most {r.max_len} characters"),
        ("min_bytes", lambda r: len(value.encode()) >= r.min_bytes, lambda r: f"needs {r.min_bytes}+ bytes"),
        ("max_bytes", lambda r: len(value.encode()) <= r.max_bytes, lambda r: f"at most {r.max_bytes} bytes"),
        ("prefix", lambda r: value.startswith(r.prefix), lambda r: f"must start with {r.prefix!r}"),
        ("suffix", lambda r: value.endswith(r.suffix), lambda r: f"must end with {r.suffix!r}"),
        ("contains", lambda r: r.contains in value, lambda r: f"must contain {r.contains!r}"),
        ("pattern", lambda r: re.search(r.pattern, value), lambda r: f"must match {r.pattern!r}"),
    )
    for name, holds, says in checks:
        if rules.HasField(name) and not holds(rules):
            problems.append(f"{value!r} {says(rules)}")
    allowed = list(getattr(rules, "in"))
    if allowed and value not in allowed:
        problems.append(f"{value!r} must be one of {allowed}")
    if value in list(rules.not_in):
        problems.append(f"{value!r} is not allowed")
    if rules.WhichOneof("well_known") == "well_known_regex":
        strict = not rules.HasField("strict") or rules.strict
        name = validate_pb2.KnownRegex.Name(rules.well_known_regex)
        pattern = {
            "HTTP_HEADER_NAME": HEADER_NAME_STRICT if strict else HEADER_LOOSE,
            "HTTP_HEADER_VALUE": HEADER_VALUE_STRICT if strict else HEADER_LOOSE,
        }.get(name)
        if pattern is not None and not pattern.match(value):
            problems.append(f"{value!r} is not a valid {name}")
    return problems


def duration_problems(value, rules) -> list[str]:
    nanos = value.seconds * 10**9 + value.nanos
    problems = []
    for bound, holds, says in (
        ("lt", lambda b: nanos < b, "<"),
        ("lte", lambda b: nanos <= b, "<="),
        ("gt", lambda b: nanos > b, ">"),
        ("gte", lambda b: nanos >= b, ">="),
    ):
        if rules.HasField(bound):
            limit = getattr(rules, bound)
            if not holds(limit.seconds * 10**9 + limit.nanos):
                problems.append(f"is {value.ToJsonString()}, must be {says} {limit.ToJsonString()}")
    return problems


NUMBER_RULES = {"uint32", "uint64", "int32", "int64", "sint32", "sint64", "fixed32",
                "fixed64", "sfixed32", "sfixed64", "double", "float"}
WRAPPERS = {"google.protobuf." + name for name in (
    "UInt32Value", "UInt64Value", "Int32Value", "Int64Value", "DoubleValue", "FloatValue",
    "BoolValue", "StringValue", "BytesValue")}


def value_problems(value, field_descriptor, rules, path: str) -> list[str]:
    """The rules of one value (a field, or an item of a repeated field)."""
    if rules is None:
        return []
    kind = rules.WhichOneof("type")
    problems: list[str] = []
    if kind in NUMBER_RULES:
        problems = number_problems(value, getattr(rules, kind))
    elif kind == "string":
        problems = string_problems(value, rules.string)
    elif kind == "enum" and rules.enum.defined_only:
        if field_descriptor.enum_type.values_by_number.get(value) is None:
            problems = [f"{value} is not a defined {field_descriptor.enum_type.name}"]
    elif kind == "duration":
        problems = duration_problems(value, rules.duration)
    elif kind == "any" and len(getattr(rules.any, "in")):
        if value.type_url not in getattr(rules.any, "in"):
            problems = [f"{value.type_url} is not one of {list(getattr(rules.any, 'in'))}"]
    return [f"{path}: {p}" for p in problems]


class Validator:
    """Envoy's protoc-gen-validate rules over a whole message tree (Any fields unpacked),
    and the deprecated or disallowed-by-default fields set in it."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.discouraged: list[str] = []

    def message(self, message, path: str) -> None:
        descriptor = message.DESCRIPTOR
        for oneof in descriptor.oneofs:
            required = rules_of(oneof.GetOptions(), validate_pb2.required)
            if required and message.WhichOneof(oneof.name) is None:
                self.problems.append(f"{path}: one of {[f.name for f in oneof.fields]} is required")
        for fd in descriptor.fields:
            here = f"{path}.{fd.name}"
            rules = rules_of(fd.GetOptions(), validate_pb2.rules)
            if is_map(fd):
                is_set = self.map_field(getattr(message, fd.name), fd, rules, here)
            elif fd.is_repeated:
                is_set = self.repeated_field(getattr(message, fd.name), fd, rules, here)
            elif fd.message_type is not None:
                is_set = self.message_field(message, fd, rules, here)
            else:
                is_set = self.scalar_field(message, fd, rules, here)
            if is_set:
                options = fd.GetOptions()
                if options.deprecated:
                    self.discouraged.append(f"{here} is deprecated")
                if rules_of(options, deprecation_pb2.disallowed_by_default):
                    self.discouraged.append(f"{here} is disallowed by default")

    def nested(self, value, fd, path: str) -> None:
        if fd.message_type.full_name == "google.protobuf.Any":
            value = unpack(value)
        self.message(value, path)

    def map_field(self, values, fd, rules, here: str) -> bool:
        if rules is not None and rules.WhichOneof("type") == "map":
            if rules.map.HasField("min_pairs") and len(values) < rules.map.min_pairs:
                self.problems.append(f"{here}: needs {rules.map.min_pairs}+ entries")
            if rules.map.HasField("max_pairs") and len(values) > rules.map.max_pairs:
                self.problems.append(f"{here}: at most {rules.map.max_pairs} entries")
        value_fd = fd.message_type.fields_by_name["value"]
        if value_fd.message_type is not None:
            for key, item in values.items():
                self.nested(item, value_fd, f"{here}[{key}]")
        return len(values) > 0

    def repeated_field(self, values, fd, rules, here: str) -> bool:
        item_rules = None
        if rules is not None and rules.WhichOneof("type") == "repeated":
            repeated = rules.repeated
            skipped = repeated.ignore_empty and len(values) == 0
            if not skipped and repeated.HasField("min_items") and len(values) < repeated.min_items:
                self.problems.append(f"{here}: needs {repeated.min_items}+ items")
            if repeated.HasField("max_items") and len(values) > repeated.max_items:
                self.problems.append(f"{here}: at most {repeated.max_items} items")
            if repeated.HasField("items"):
                item_rules = repeated.items
        for i, item in enumerate(values):
            self.problems += value_problems(item, fd, item_rules, f"{here}[{i}]")
            if fd.message_type is not None:
                self.nested(item, fd, f"{here}[{i}]")
        return len(values) > 0

    def message_field(self, message, fd, rules, here: str) -> bool:
        present = message.HasField(fd.name)
        kind = rules.WhichOneof("type") if rules is not None else None
        # FieldRules.message sits outside the `type` oneof; duration, any and timestamp
        # rules carry their own `required`. A oneof's members are required only as its
        # choice, which is the oneof's own rule.
        required = (rules is not None and rules.HasField("message") and rules.message.required) or (
            kind in ("duration", "any", "timestamp") and getattr(rules, kind).required
        )
        if required and not present and fd.containing_oneof is None:
            self.problems.append(f"{here}: is required")
        if not present:
            return False
        value = getattr(message, fd.name)
        name = fd.message_type.full_name
        if name in WRAPPERS:
            self.problems += value_problems(value.value, fd, rules, here)
        elif name in ("google.protobuf.Duration", "google.protobuf.Any"):
            self.problems += value_problems(value, fd, rules, here)
        self.nested(value, fd, here)
        return True

    def scalar_field(self, message, fd, rules, here: str) -> bool:
        value = getattr(message, fd.name)
        is_set = message.HasField(fd.name) if fd.has_presence else value != fd.default_value
        # A plain proto3 scalar is held to its rules even when unset (an empty domain fails
        # min_len); one with presence (a oneof member, `optional`) only when set.
        if is_set or not fd.has_presence:
            self.problems += value_problems(value, fd, rules, here)
        if fd.enum_type is not None and is_set:
            enum_value = fd.enum_type.values_by_number.get(value)
            if enum_value is not None and enum_value.GetOptions().deprecated:
                self.discouraged.append(f"{here}: {enum_value.name} is deprecated")
            if enum_value is not None and rules_of(
                enum_value.GetOptions(), deprecation_pb2.disallowed_by_default_enum
            ):
                self.discouraged.append(f"{here}: {enum_value.name} is disallowed by default")
        return is_set


# ---------------------------------------------------------------- quotad.toml


@dataclass
class Domain:
    name: str
    settings: dict
    problems: list[str] = field(default_factory=list)

    def key(self, setting: str) -> str:
        return self.settings[setting]

    def mapped_keys(self) -> dict[str, str]:
        """Descriptor key -> what quotad reads from it."""
        keys = {self.key("school_key"): "school", self.key("teacher_key"): "teacher"}
        if self.settings["service_type"] is None:
            keys[self.key("service_key")] = "service"
        for setting, role in (("event_key", "event"), ("model_key", "model"), ("phase_key", "phase")):
            if self.key(setting):
                keys[self.key(setting)] = role
        return keys


def read_domain(table: dict) -> Domain:
    unknown = sorted(set(table) - set(DOMAIN_DEFAULTS))
    settings = {**DOMAIN_DEFAULTS, **table}
    domain = Domain(str(settings["name"]), settings)
    if unknown:
        domain.problems.append(f"unknown settings {unknown}")
    if not DOMAIN_NAME.fullmatch(domain.name):
        domain.problems.append("name must be 1-64 letters, digits and _ - . :")
    if not settings["schools"]:
        domain.problems.append('schools is empty (["*"] for any school)')
    if settings["unknown_slice"] not in ("deny", "allow"):
        domain.problems.append('unknown_slice must be "deny" or "allow"')
    if settings["service_type"] is not None and not ID_VALUE.fullmatch(settings["service_type"]):
        domain.problems.append("service_type must be [a-z0-9_]{1,64}")
    required = ["school_key", "teacher_key"] + ([] if settings["service_type"] else ["service_key"])
    for setting in required:
        if not settings[setting]:
            domain.problems.append(f"{setting} must not be empty")
    keys = [settings[s] for s in required] + [
        settings[s] for s in ("event_key", "model_key", "phase_key") if settings[s]
    ]
    if len(set(keys)) != len(keys):
        domain.problems.append("its descriptor keys must all differ")
    return domain


# Where quotad binds its token-less listener without rls_allow_public (config.rs).
PRIVATE_NETWORKS = [ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
    "::1/128", "fc00::/7", "fe80::/10")]


def is_private(ip) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in PRIVATE_NETWORKS if network.version == ip.version)


def read_quotad(report: Report, path: Path):
    try:
        config = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        report.check(False, f"{path.name}: parses as TOML", str(error))
        return None, {}
    report.check(True, f"{path.name}: parses as TOML")
    domains = {}
    for table in config.get("rls_domains", []):
        domain = read_domain(table)
        report.check(
            not domain.problems and domain.name not in domains,
            f"{path.name}: [[rls_domains]] {domain.name!r} is a table quotad accepts",
            "; ".join(domain.problems) or "configured twice",
        )
        domains[domain.name] = domain
    rls_addr = str(config.get("rls_addr", "127.0.0.1:8081"))
    allow_public = bool(config.get("rls_allow_public", False))
    host, _, port = rls_addr.rpartition(":")
    host = host.strip("[]")
    try:
        private = is_private(ipaddress.ip_address(host))
        address = (host, int(port))
    except ValueError:
        report.check(False, f"{path.name}: rls_addr {rls_addr!r} is an IP address and a port")
        return None, domains
    report.check(
        private or allow_public,
        f"{path.name}: rls_addr {rls_addr} is loopback or private (or rls_allow_public is set)",
        "quotad refuses to bind its token-less listener there",
    )
    return address, domains


# ---------------------------------------------------------------- descriptors


@dataclass
class Entry:
    key: str | None          # None: an extension whose key this script cannot know
    value: str | None = None  # fixed values only (generic_key, header_value_match)
    header: str | None = None  # request_headers: the header it reads
    optional: bool = False   # skip_if_absent


def entry_of(action) -> Entry:
    kind = action.WhichOneof("action_specifier")
    spec = getattr(action, kind)
    if kind == "request_headers":
        return Entry(spec.descriptor_key, header=spec.header_name.lower(), optional=spec.skip_if_absent)
    if kind == "generic_key":
        return Entry(spec.descriptor_key or "generic_key", spec.descriptor_value)
    if kind == "header_value_match":
        return Entry(spec.descriptor_key or "header_match", spec.descriptor_value)
    if kind == "query_parameter_value_match":
        return Entry(spec.descriptor_key or "query_match", spec.descriptor_value)
    if kind in ("query_parameters", "dynamic_metadata", "metadata"):
        return Entry(spec.descriptor_key, optional=kind == "metadata" and spec.skip_if_absent)
    if kind in ("source_cluster", "destination_cluster", "remote_address", "masked_remote_address"):
        return Entry(kind)
    return Entry(None)


def wanted_keys(domain: Domain) -> list[str]:
    """The keys every descriptor must carry for quotad to find a slice and an event."""
    keys = [domain.key("school_key"), domain.key("teacher_key")]
    if domain.settings["service_type"] is None:
        keys.append(domain.key("service_key"))
    if domain.key("event_key"):
        keys.append(domain.key("event_key"))
    return keys


def check_descriptor(report: Report, label: str, rate_limit, domain: Domain) -> set[str]:
    """One RateLimit entry's descriptor against the domain; the headers it needs."""
    by_key: dict[str, list[Entry]] = {}
    for entry in (entry_of(action) for action in rate_limit.actions):
        if entry.key is not None:
            by_key.setdefault(entry.key, []).append(entry)
    twice = sorted(k for k, e in by_key.items() if k in domain.mapped_keys() and len(e) > 1)
    report.check(not twice, f"{label}: no mapped key twice", f"{twice} (quotad refuses it)")
    wanted = wanted_keys(domain)
    missing = [k for k in wanted if k not in by_key]
    optional = [k for k in wanted if k in by_key and by_key[k][0].optional]
    report.check(
        not missing and not optional,
        f"{label}: always carries {', '.join(wanted)}",
        f"missing {missing}" if missing else f"skip_if_absent on {optional}: quotad would see "
        "no slice (school, teacher, service) or no event id",
    )
    service = by_key.get(domain.key("service_key"), [])
    if domain.settings["service_type"] is None and service and service[0].value is not None:
        report.check(bool(ID_VALUE.fullmatch(service[0].value)),
                     f"{label}: service type {service[0].value!r} is [a-z0-9_]{{1,64}}")
    phase_key = domain.key("phase_key")
    phase = [e.value for e in by_key.get(phase_key, [])] if phase_key else []
    addend = rate_limit.hits_addend if rate_limit.HasField("hits_addend") else None
    if rate_limit.apply_on_stream_done:
        report.check(phase == ["stream_done"], f"{label}: carries {phase_key}=stream_done",
                     f"has {phase_key}={phase}: quotad would take it for a request-path call")
        report.check(addend is not None and (addend.format != "" or addend.HasField("number")),
                     f"{label}: charges a hits_addend (the usage)",
                     "no hits_addend: each call would charge 1")
    else:
        report.check(phase in ([], ["request"]), f"{label}: has no stream_done phase",
                     f"{phase_key}={phase}")
        if domain.settings["holds"]:
            report.check(addend is not None, f"{label}: sets the units to hold (holds = true)",
                         "no hits_addend: each request would hold 1 unit")
        else:
            report.check(
                addend is not None and addend.HasField("number") and addend.number.value == 0,
                f"{label}: is a pure check (hits_addend number 0)",
                "without holds, units on the request path are consumed before the call and "
                "charged again when it is done",
            )
    return {e.header for k in wanted for e in by_key.get(k, []) if e.header and not e.optional}


def check_rate_limits(report: Report, where: str, rate_limits, domain: Domain, route) -> None:
    """The descriptors one route sends, against the domain's keys."""
    request_path = [r for r in rate_limits if not r.apply_on_stream_done]
    stream_done = [r for r in rate_limits if r.apply_on_stream_done]
    report.check(
        len(request_path) >= 1 and len(stream_done) >= 1,
        f"{where}: a request-path rate limit and an apply_on_stream_done one",
        f"{len(request_path)} request-path, {len(stream_done)} stream-done",
    )
    needed: set[str] = set()
    for i, rate_limit in enumerate(rate_limits):
        phase = "stream done" if rate_limit.apply_on_stream_done else "request path"
        needed |= check_descriptor(report, f"{where} rate_limits[{i}] ({phase})", rate_limit, domain)
    # A request_headers action whose header is missing makes no descriptor, and then no
    # call: the route itself must require the headers, or such a request passes unchecked.
    # (Envoy sets x-request-id on every request.)
    matched = {
        h.name.lower() for h in route.match.headers
        if not h.invert_match
        and (h.present_match or h.HasField("string_match") or h.HasField("safe_regex_match"))
    }
    unmatched = sorted(needed - matched - {"x-request-id"})
    report.check(
        not unmatched,
        f"{where}: the route requires the headers the descriptors need ({', '.join(sorted(needed))})",
        f"{unmatched} may be absent: then no descriptor is sent and the request is not checked",
    )


def check_envoy(report: Report, path: Path, quotad_addr, domains: dict[str, Domain]) -> None:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        report.check(False, f"{path.name}: parses as YAML", str(error))
        return
    report.check(True, f"{path.name}: parses as YAML")
    urls = sorted(type_urls(document))
    unresolved = [f"{u}: {p}" for u in urls if (p := import_type(u))]
    report.check(
        not unresolved,
        f"{path.name}: the proto of every @type imports ({len(urls)} types)",
        "; ".join(unresolved),
    )
    if unresolved:
        return
    bootstrap = bootstrap_pb2.Bootstrap()
    try:
        json_format.ParseDict(document, bootstrap, ignore_unknown_fields=False)
    except json_format.ParseError as error:
        report.check(False, f"{path.name}: is an envoy.config.bootstrap.v3.Bootstrap", str(error))
        return
    report.check(True, f"{path.name}: is an envoy.config.bootstrap.v3.Bootstrap (no unknown field)")
    validator = Validator()
    validator.message(bootstrap, "bootstrap")
    report.check(not validator.problems,
                 f"{path.name}: holds Envoy's validation rules (protoc-gen-validate)",
                 "; ".join(validator.problems[:10]))
    report.check(not validator.discouraged,
                 f"{path.name}: sets no deprecated or disallowed-by-default field",
                 "; ".join(validator.discouraged[:10]))

    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    found_filter = False
    for listener in bootstrap.static_resources.listeners:
        for chain in listener.filter_chains:
            for network_filter in chain.filters:
                if network_filter.typed_config.type_url != HCM:
                    continue
                hcm = unpack(network_filter.typed_config)
                for http_filter in hcm.http_filters:
                    if http_filter.typed_config.type_url != RATELIMIT_FILTER:
                        continue
                    found_filter = True
                    check_ratelimit_filter(report, http_filter, hcm, clusters, quotad_addr, domains)
    report.check(found_filter, f"{path.name}: has an envoy.filters.http.ratelimit filter")


def check_ratelimit_filter(report, http_filter, hcm, clusters, quotad_addr, domains) -> None:
    config = unpack(http_filter.typed_config)
    name = f"filter {http_filter.name} (domain {config.domain!r})"
    domain = domains.get(config.domain)
    report.check(domain is not None, f"{name}: quotad.toml configures its domain",
                 f"configured: {sorted(domains)}")
    report.check(config.failure_mode_deny, f"{name}: failure_mode_deny (a quota gate fails closed)")
    service = config.rate_limit_service
    report.check(
        service.transport_api_version == config_source_pb2.ApiVersion.Value("V3"),
        f"{name}: transport_api_version V3",
    )
    cluster_name = service.grpc_service.envoy_grpc.cluster_name
    cluster = clusters.get(cluster_name)
    report.check(cluster is not None, f"{name}: its cluster {cluster_name!r} is defined")
    if cluster is not None:
        check_rls_cluster(report, cluster, quotad_addr)
    if domain is None:
        return
    if domain.settings["response_headers"]:
        report.check(
            config.enable_x_ratelimit_headers == 0,
            f"{name}: X-RateLimit headers come from one side only",
            "quotad's response_headers and Envoy's enable_x_ratelimit_headers would both add them",
        )
    route_config = hcm.route_config
    for vhost in route_config.virtual_hosts:
        for rl in list(vhost.rate_limits):
            report.check(not rl.HasField("hits_addend"),
                         f"virtual host {vhost.name}: no hits_addend in rate_limits",
                         "Envoy reads hits_addend only from the filter's per-route rate_limits")
        for route in vhost.routes:
            where = f"route {route.name or route.match}"
            for rl in list(route.route.rate_limits):
                report.check(not rl.HasField("hits_addend"), f"{where}: no hits_addend in route.rate_limits",
                             "Envoy reads hits_addend only from the filter's per-route rate_limits")
            per_route = route.typed_per_filter_config.get(http_filter.name)
            if per_route is None or per_route.type_url != RATELIMIT_PER_ROUTE:
                continue
            per_route = unpack(per_route)
            route_domain = domains.get(per_route.domain or config.domain)
            if not report.check(route_domain is not None, f"{where}: its domain is configured",
                                f"{per_route.domain!r} is not in quotad.toml"):
                continue
            check_rate_limits(report, where, per_route.rate_limits, route_domain, route)


def check_rls_cluster(report: Report, cluster, quotad_addr) -> None:
    options = cluster.typed_extension_protocol_options.get(HTTP_PROTOCOL_OPTIONS)
    http2 = False
    if options is not None:
        http2 = unpack(options).explicit_http_config.HasField("http2_protocol_options")
    report.check(http2, f"cluster {cluster.name}: speaks HTTP/2 (gRPC)")
    addresses = [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for locality in cluster.load_assignment.endpoints
        for e in locality.lb_endpoints
    ]
    report.check(
        quotad_addr is not None and addresses == [quotad_addr],
        f"cluster {cluster.name}: reaches quotad.toml's rls_addr {quotad_addr}",
        f"endpoints {addresses}",
    )


# ---------------------------------------------------------------- Envoy Gateway


def check_gateway(report: Report, path: Path, domains: dict[str, Domain]) -> None:
    """backend-traffic-policy.yaml: the descriptor keys Envoy Gateway generates from the
    rule (rule-<rule>-match-<header>) against the domain its EnvoyPatchPolicy sets."""
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except (OSError, yaml.YAMLError) as error:
        report.check(False, f"{path.name}: parses as YAML", str(error))
        return
    report.check(True, f"{path.name}: parses as YAML ({len(documents)} resources)")
    by_kind: dict[str, list[dict]] = {}
    for document in documents:
        by_kind.setdefault(document.get("kind"), []).append(document)
    patches = [p for d in by_kind.get("EnvoyPatchPolicy", []) for p in d["spec"]["jsonPatches"]]
    domain_names = [
        p["operation"]["value"] for p in patches
        if p["operation"].get("jsonPath", "").endswith(".domain")
    ]
    report.check(len(domain_names) == 1 and domain_names[0] in domains,
                 f"{path.name}: the EnvoyPatchPolicy sets a domain quotad.toml configures",
                 f"sets {domain_names}, configured {sorted(domains)}")
    if not (len(domain_names) == 1 and domain_names[0] in domains):
        return
    domain = domains[domain_names[0]]
    phase_added = [
        p["operation"]["value"] for p in patches
        if "apply_on_stream_done" in p["operation"].get("jsonPath", "") and p["operation"]["op"] == "add"
    ]
    report.check(
        phase_added == [{"generic_key": {"descriptor_key": domain.key("phase_key"),
                                         "descriptor_value": "stream_done"}}],
        f"{path.name}: the EnvoyPatchPolicy adds {domain.key('phase_key')}=stream_done to the stream-done entry",
        f"adds {phase_added}",
    )
    for policy in by_kind.get("BackendTrafficPolicy", []):
        rules = policy["spec"]["rateLimit"]["global"]["rules"]
        for r, rule in enumerate(rules):
            where = f"{path.name}: BackendTrafficPolicy {policy['metadata']['name']} rule {r}"
            headers = [h for s in rule.get("clientSelectors", []) for h in s.get("headers", [])]
            generated = {f"rule-{r}-match-{m}": h for m, h in enumerate(headers)}
            wanted = wanted_keys(domain)
            distinct = [k for k in wanted if generated.get(k, {}).get("type") == "Distinct"]
            report.check(
                distinct == wanted,
                f"{where}: its Distinct headers give the keys of domain {domain.name!r}",
                f"needs Distinct headers at {wanted}, got {list(generated)}",
            )
            cost = rule.get("cost", {})
            request = cost.get("request", {})
            report.check(
                request.get("from") == "Number" and request.get("number") == 0,
                f"{where}: the request cost is 0 (a pure check)",
            )
            report.check(cost.get("response", {}).get("from") == "Metadata",
                         f"{where}: the response cost comes from the token metadata")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envoy", type=Path, default=HERE / "envoy.yaml")
    parser.add_argument("--quotad", type=Path, default=HERE / "quotad.toml")
    parser.add_argument("--gateway", type=Path, default=HERE / "backend-traffic-policy.yaml")
    args = parser.parse_args()
    report = Report()
    quotad_addr, domains = read_quotad(report, args.quotad)
    check_envoy(report, args.envoy, quotad_addr, domains)
    check_gateway(report, args.gateway, domains)
    print(f"{report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
