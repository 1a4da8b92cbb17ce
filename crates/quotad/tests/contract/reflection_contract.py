"""quotad's rls_addr answers gRPC health and server reflection (v1 and v1alpha),
and the descriptors it reflects for Envoy's and Kuadrant's rate limit services
agree with the other projects' own files: every message, enum and service that
quotad declares in the envoy.* and kuadrant.* packages has exactly the fields
(name, number, type, label), values and methods of Envoy's definitions (the
xds-protos package) and of Limitador's kuadrantrls.proto (vendored; stubs from
kuadrant_stubs.py in --stubs-dir).
"""

import grpc
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from contract_common import CALL_TIMEOUT_S, Checks, channel, parse_scenario
from kuadrant_stubs import import_stubs

ENVOY_SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
KUADRANT_SERVICE = "kuadrant.service.ratelimit.v1.RateLimitService"
HEALTH_SERVICE = "grpc.health.v1.Health"
# Everything rls_addr serves.
RLS_ADDR_SERVICES = (
    ENVOY_SERVICE,
    KUADRANT_SERVICE,
    HEALTH_SERVICE,
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)
# The packages whose definitions belong to Envoy and Kuadrant (google.* are
# protobuf's well-known types, the same everywhere).
COMPARED_PACKAGES = ("envoy.", "kuadrant.")
# Files a reflection walk follows at most: a bound on a server that keeps
# naming new dependencies.
REFLECTED_FILES_MAX = 64


def failure(error):
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error)


class Reflection:
    """One ServerReflectionInfo stream per request, v1 or v1alpha. The two
    versions' messages are the same on the wire, so v1alpha's generated
    classes serve both."""

    def __init__(self, chan, version):
        self.version = version
        self.method = chan.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )

    def ask(self, request):
        responses = list(self.method(iter([request]), timeout=CALL_TIMEOUT_S))
        if len(responses) != 1:
            raise AssertionError(f"{len(responses)} answers to one reflection request")
        response = responses[0]
        if response.HasField("error_response"):
            error = response.error_response
            raise AssertionError(f"reflection error {error.error_code}: {error.error_message}")
        return response

    def services(self):
        answer = self.ask(reflection_pb2.ServerReflectionRequest(list_services=""))
        return sorted(service.name for service in answer.list_services_response.service)

    def files_for(self, symbol):
        """The file declaring `symbol` and every file it depends on, by name."""
        files = {}
        answer = self.ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
        pending = list(answer.file_descriptor_response.file_descriptor_proto)
        while pending:
            proto = descriptor_pb2.FileDescriptorProto.FromString(pending.pop())
            files[proto.name] = proto
            if len(files) > REFLECTED_FILES_MAX:
                raise AssertionError(f"more than {REFLECTED_FILES_MAX} files reflected for {symbol}")
            for dependency in proto.dependency:
                if dependency not in files:
                    request = reflection_pb2.ServerReflectionRequest(file_by_filename=dependency)
                    pending.extend(self.ask(request).file_descriptor_response.file_descriptor_proto)
        return list(files.values())


def definitions(files):
    """Every message, enum and service in `files`, by full name."""
    found = {}

    def walk_message(prefix, message):
        name = f"{prefix}.{message.name}"
        found[name] = message
        for nested in message.nested_type:
            walk_message(name, nested)
        for enum in message.enum_type:
            found[f"{name}.{enum.name}"] = enum

    for proto in files:
        prefix = proto.package
        for message in proto.message_type:
            walk_message(prefix, message)
        for enum in proto.enum_type:
            found[f"{prefix}.{enum.name}"] = enum
        for service in proto.service:
            found[f"{prefix}.{service.name}"] = service
    return found


def shape(definition):
    """What a definition puts on the wire, comparable with ==."""
    if isinstance(definition, descriptor_pb2.DescriptorProto):
        oneofs = [oneof.name for oneof in definition.oneof_decl]
        return {
            field.number: (
                field.name,
                descriptor_pb2.FieldDescriptorProto.Type.Name(field.type),
                descriptor_pb2.FieldDescriptorProto.Label.Name(field.label),
                field.type_name.lstrip("."),
                oneofs[field.oneof_index] if field.HasField("oneof_index") and not field.proto3_optional else "",
            )
            for field in definition.field
        }
    if isinstance(definition, descriptor_pb2.EnumDescriptorProto):
        return {value.name: value.number for value in definition.value}
    return {
        method.name: (
            method.input_type.lstrip("."),
            method.output_type.lstrip("."),
            method.client_streaming,
            method.server_streaming,
        )
        for method in definition.method
    }


def reference_files(modules):
    """FileDescriptorProtos of the generated `modules` and all their dependencies."""
    files = {}

    def add(file_descriptor):
        if file_descriptor.name in files:
            return
        for dependency in file_descriptor.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file_descriptor.CopyToProto(proto)
        files[file_descriptor.name] = proto

    for module in modules:
        add(module.DESCRIPTOR)
    return list(files.values())


def compare(checks, what, served_files, reference):
    served = definitions(served_files)
    compared = 0
    for name, definition in sorted(served.items()):
        if not name.startswith(COMPARED_PACKAGES):
            continue
        compared += 1
        if name not in reference:
            checks.check(False, f"{what}: {name} is one of the other project's definitions", "not there")
            continue
        ours, theirs = shape(definition), shape(reference[name])
        if ours != theirs:
            differences = {
                key: {"quotad": ours.get(key), "theirs": theirs.get(key)}
                for key in sorted(set(ours) | set(theirs), key=str)
                if ours.get(key) != theirs.get(key)
            }
            checks.check(False, f"{what}: {name} as the other project defines it", differences)
        else:
            checks.passed += 1
    checks.check(compared > 0, f"{what}: {compared} envoy/kuadrant definitions compared", compared)


def main():
    scenario = parse_scenario(__doc__)
    kuadrant_pb2, _ = import_stubs(scenario.stubs_dir)
    checks = Checks("reflection")
    chan = channel(scenario.rls_addr)

    health = health_pb2_grpc.HealthStub(chan)
    answer = checks.call("health Check", health.Check, health_pb2.HealthCheckRequest(service=""))
    if answer:
        checks.equal(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status), "SERVING", "health status")

    reference = definitions(reference_files([rls_pb2, kuadrant_pb2]))
    for version in ("v1", "v1alpha"):
        reflection = Reflection(chan, version)
        try:
            services = reflection.services()
        except (grpc.RpcError, AssertionError) as error:
            checks.check(False, f"reflection {version}: list services", failure(error))
            continue
        for service in (ENVOY_SERVICE, KUADRANT_SERVICE, HEALTH_SERVICE):
            checks.check(service in services, f"reflection {version}: lists {service}", services)
        # Reflection describes the port it is on: quotad's own services are
        # not served on rls_addr (they need a token), so they are not listed.
        not_served = sorted(set(services) - set(RLS_ADDR_SERVICES))
        checks.check(not not_served, f"reflection {version}: lists only what rls_addr serves", not_served)
        for service in (ENVOY_SERVICE, KUADRANT_SERVICE):
            try:
                files = reflection.files_for(service)
            except (grpc.RpcError, AssertionError) as error:
                checks.check(False, f"reflection {version}: the files of {service}", failure(error))
                continue
            compare(checks, f"reflection {version} ({service})", files, reference)
    checks.finish()


if __name__ == "__main__":
    main()
