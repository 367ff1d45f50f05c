#!/usr/bin/env python3
"""A gRPC client nobody in this project wrote, driving lab-server by reflection.

It imports no generated lab code: every service, method and message is
discovered at run time through the server reflection service (v1, falling
back to v1alpha), turned into a descriptor pool, and called with message
classes made from that pool. Only `grpcio`, `grpcio-reflection` and
`protobuf` are used (see requirements.txt).

    python3 tests/python/reflection_client.py --server 127.0.0.1:7621 \
        --token TOKEN [--expect-auth] [--expect-principal NAME]

Prints one line per check and exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable

try:
    import grpc
    from google.protobuf import descriptor_pb2, descriptor_pool, json_format
    from google.protobuf.message_factory import GetMessageClass

    # The request/response messages of grpc.reflection.v1alpha. Those of
    # grpc.reflection.v1 are the same messages field for field (same numbers,
    # same types), so these classes encode and decode both protocols; only
    # the method path differs.
    from grpc_reflection.v1alpha import reflection_pb2 as refl_pb2
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
except ImportError as e:  # pragma: no cover - reported to the Rust test
    print(
        f"MISSING-PYTHON-PACKAGES: {e}; run `pip install -r tests/python/requirements.txt`",
        file=sys.stderr,
    )
    sys.exit(3)

LAB_SERVICES = (
    "lab.v1.HostService",
    "lab.v1.LeaseService",
    "lab.v1.EventService",
    "lab.v1.AdminService",
)
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_VERSIONS = ("v1", "v1alpha")
TIMEOUT = 15.0


class CheckFailed(Exception):
    pass


def ok(name: str, detail: str = "") -> None:
    print(f"ok    {name}" + (f": {detail}" if detail else ""), flush=True)


def fail(name: str, why: str) -> None:
    raise CheckFailed(f"{name}: {why}")


def rpc_error_text(e: grpc.RpcError) -> str:
    try:
        return f"{e.code().name}: {e.details()}"
    except Exception:  # noqa: BLE001 - any RpcError shape
        return repr(e)


# ---------------------------------------------------------------- reflection


class Reflection:
    """One bidirectional ServerReflectionInfo stream per request list."""

    def __init__(self, channel: grpc.Channel, version: str, metadata):
        self.version = version
        self.metadata = metadata
        self._call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=refl_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=refl_pb2.ServerReflectionResponse.FromString,
        )

    def ask(self, requests: list) -> list:
        try:
            responses = list(self._call(iter(requests), metadata=self.metadata, timeout=TIMEOUT))
        except grpc.RpcError as e:
            # tonic-reflection ends the whole stream with a status (e.g.
            # NOT_FOUND) where the protocol has an in-stream error_response.
            asked = ", ".join(f"{r.WhichOneof('message_request')}={_asked(r)!r}" for r in requests)
            raise CheckFailed(f"reflection {self.version}: {asked} -> {rpc_error_text(e)}") from e
        if len(responses) != len(requests):
            raise CheckFailed(
                f"reflection {self.version}: {len(requests)} requests got {len(responses)} responses"
            )
        for req, resp in zip(requests, responses):
            if resp.HasField("error_response"):
                what = req.WhichOneof("message_request")
                raise CheckFailed(
                    f"reflection {self.version}: {what}={getattr(req, what)!r} -> "
                    f"error {_status_code_name(resp.error_response.error_code)}"
                    f" {resp.error_response.error_message!r}"
                )
        return responses

    def list_services(self) -> list[str]:
        [resp] = self.ask([refl_pb2.ServerReflectionRequest(list_services="")])
        return [s.name for s in resp.list_services_response.service]

    def files_containing(self, symbol: str) -> list[descriptor_pb2.FileDescriptorProto]:
        [resp] = self.ask([refl_pb2.ServerReflectionRequest(file_containing_symbol=symbol)])
        return _parse_files(resp)

    def file_by_name(self, name: str) -> list[descriptor_pb2.FileDescriptorProto]:
        [resp] = self.ask([refl_pb2.ServerReflectionRequest(file_by_filename=name)])
        return _parse_files(resp)


def _asked(req) -> str:
    what = req.WhichOneof("message_request")
    return str(getattr(req, what)) if what else ""


def _parse_files(resp) -> list[descriptor_pb2.FileDescriptorProto]:
    out = []
    for raw in resp.file_descriptor_response.file_descriptor_proto:
        fd = descriptor_pb2.FileDescriptorProto()
        fd.ParseFromString(raw)
        out.append(fd)
    return out


def _status_code_name(n: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == n:
            return code.name
    return str(n)


class Schema:
    """Every file the server told us about, in a fresh descriptor pool (so the
    well-known types too must come from the server, not from this library)."""

    def __init__(self, refl: Reflection):
        self.refl = refl
        self.files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        self.fetched_by_name: list[str] = []
        self.pool = descriptor_pool.DescriptorPool()
        self._added: set[str] = set()

    def load_symbol(self, symbol: str) -> None:
        for fd in self.refl.files_containing(symbol):
            self.files.setdefault(fd.name, fd)
        # Any dependency not sent along: ask for it by file name.
        missing = self._missing()
        while missing:
            for name in missing:
                got = self.refl.file_by_name(name)
                if not any(fd.name == name for fd in got):
                    raise CheckFailed(
                        f"reflection {self.refl.version}: file_by_filename={name!r} "
                        f"did not return that file (got {[fd.name for fd in got]})"
                    )
                self.fetched_by_name.append(name)
                for fd in got:
                    self.files.setdefault(fd.name, fd)
            missing = self._missing()
        for name in list(self.files):
            self._add(name, [])

    def _missing(self) -> list[str]:
        return sorted({d for fd in self.files.values() for d in fd.dependency if d not in self.files})

    def _add(self, name: str, stack: list[str]) -> None:
        if name in self._added:
            return
        if name in stack:
            raise CheckFailed(f"import cycle: {' -> '.join(stack + [name])}")
        fd = self.files[name]
        for dep in fd.dependency:
            self._add(dep, stack + [name])
        self.pool.Add(fd)
        self._added.add(name)

    def message(self, full_name: str):
        return GetMessageClass(self.pool.FindMessageTypeByName(full_name))

    def enum_number(self, enum_full_name: str, value: str) -> int:
        return self.pool.FindEnumTypeByName(enum_full_name).values_by_name[value].number

    def enum_name(self, enum_full_name: str, number: int) -> str:
        return self.pool.FindEnumTypeByName(enum_full_name).values_by_number[number].name

    def method_proto(self, service: str, method: str) -> descriptor_pb2.MethodDescriptorProto:
        pkg, _, svc = service.rpartition(".")
        for fd in self.files.values():
            if fd.package != pkg:
                continue
            for s in fd.service:
                if s.name == svc:
                    for m in s.method:
                        if m.name == method:
                            return m
        raise CheckFailed(f"method {service}/{method} is not in the reflected descriptors")


class Client:
    """Calls methods by name, with types from the schema."""

    def __init__(self, channel: grpc.Channel, schema: Schema):
        self.channel = channel
        self.schema = schema

    def _types(self, service: str, method: str):
        # Resolve the method through the pool (checks the service descriptor
        # is consistent) and its streaming shape through the raw proto.
        svc = self.schema.pool.FindServiceByName(service)
        md = svc.methods_by_name[method]
        mp = self.schema.method_proto(service, method)
        req_cls = GetMessageClass(md.input_type)
        resp_cls = GetMessageClass(md.output_type)
        return f"/{service}/{method}", req_cls, resp_cls, mp

    def request(self, service: str, method: str, fields: dict):
        _, req_cls, _, _ = self._types(service, method)
        return json_format.ParseDict(fields, req_cls())

    def unary(self, service: str, method: str, fields: dict, metadata):
        path, req_cls, resp_cls, mp = self._types(service, method)
        if mp.client_streaming or mp.server_streaming:
            raise CheckFailed(f"{path} is not unary")
        call = self.channel.unary_unary(
            path,
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        return call(json_format.ParseDict(fields, req_cls()), metadata=metadata, timeout=TIMEOUT)

    def server_stream(self, service: str, method: str, fields: dict, metadata) -> Iterable:
        path, req_cls, resp_cls, mp = self._types(service, method)
        if mp.client_streaming or not mp.server_streaming:
            raise CheckFailed(f"{path} is not server-streaming")
        call = self.channel.unary_stream(
            path,
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        return call(json_format.ParseDict(fields, req_cls()), metadata=metadata, timeout=TIMEOUT)


def as_json(msg) -> str:
    return json_format.MessageToJson(msg, indent=None, preserving_proto_field_name=True)


def expect_error(name: str, code: grpc.StatusCode, fn: Callable[[], object], must_mention: str = "") -> str:
    try:
        got = fn()
        # Drain streams: the error of a streaming call comes with iteration.
        if hasattr(got, "__iter__") and not isinstance(got, (str, bytes)):
            for _ in got:
                pass
    except grpc.RpcError as e:
        if e.code() != code:
            fail(name, f"expected {code.name}, got {rpc_error_text(e)}")
        if must_mention and must_mention not in (e.details() or ""):
            fail(name, f"{code.name} message {e.details()!r} does not name {must_mention!r}")
        return e.details() or ""
    fail(name, f"expected {code.name}, but the call succeeded")
    return ""


# ---------------------------------------------------------------- checks


def pick_reflection(
    channel: grpc.Channel, metadata, versions: tuple[str, ...]
) -> tuple[Reflection, dict[str, list[str]]]:
    """List services with every reflection version; the first that works is
    used for the rest. Returns it and the services each working version saw."""
    seen: dict[str, list[str]] = {}
    errors: dict[str, str] = {}
    for v in versions:
        try:
            seen[v] = Reflection(channel, v, metadata).list_services()
        except CheckFailed as e:
            errors[v] = str(e)
            print(f"info  reflection {v} unavailable: {errors[v]}", flush=True)
    if not seen:
        fail("reflection", f"no reflection service answered: {errors}")
    chosen = next(v for v in versions if v in seen)
    return Reflection(channel, chosen, metadata), seen


def run(args: argparse.Namespace) -> None:
    auth = [("authorization", f"Bearer {args.token}")]
    channel = grpc.insecure_channel(args.server)
    try:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
    except grpc.FutureTimeoutError:
        fail("connect", f"no connection to {args.server} within {TIMEOUT}s")
    ok("connect", args.server)

    # -- reflection: which versions, which services
    versions = REFLECTION_VERSIONS if args.reflection == "auto" else (args.reflection,)
    refl, seen = pick_reflection(channel, auth, versions)
    ok("reflection", f"using {refl.version} (working: {', '.join(seen)})")
    if len(seen) > 1:
        # Each reflection service lists itself (tonic registers one per
        # version); compare the rest.
        lists = {v: sorted(x for x in s if not x.startswith("grpc.reflection.")) for v, s in seen.items()}
        if len({tuple(s) for s in lists.values()}) != 1:
            fail("reflection", f"versions disagree on the service list: {lists}")
        ok("reflection versions agree", f"{len(lists[refl.version])} services besides reflection")
    services = seen[refl.version]
    missing = [s for s in LAB_SERVICES if s not in services]
    if missing:
        fail("list services", f"missing {missing}; server lists {sorted(services)}")
    ok("list services", ", ".join(sorted(services)))

    # -- descriptors, for every lab service and health, from the chosen version
    schema = Schema(refl)
    for s in LAB_SERVICES + (HEALTH_SERVICE,):
        if s not in services:
            fail("descriptors", f"{s} is not listed by reflection")
        schema.load_symbol(s)
    for wkt in ("google/protobuf/timestamp.proto", "google/protobuf/duration.proto"):
        if wkt not in schema.files:
            fail("descriptors", f"{wkt} was not served")
    ok(
        "descriptors",
        f"{len(schema.files)} files: {', '.join(sorted(schema.files))}"
        + (f" (fetched by name: {', '.join(schema.fetched_by_name)})" if schema.fetched_by_name else ""),
    )
    # The other reflection version must serve the same files.
    for v in seen:
        if v == refl.version:
            continue
        other = Schema(Reflection(channel, v, auth))
        for s in LAB_SERVICES + (HEALTH_SERVICE,):
            other.load_symbol(s)
        a = {n: fd.SerializeToString(deterministic=True) for n, fd in schema.files.items()}
        b = {n: fd.SerializeToString(deterministic=True) for n, fd in other.files.items()}
        if a != b:
            fail(f"descriptors via {v}", f"differ from {refl.version}: {sorted(a)} vs {sorted(b)}")
        ok(f"descriptors via {v}", f"same {len(b)} files as via {refl.version}")

    # grpcio-reflection's own client (v1alpha, as a stock Python tool would
    # use it) must resolve the same services and message types.
    if "v1alpha" in seen:
        stock = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        methods = 0
        try:
            for s in LAB_SERVICES + (HEALTH_SERVICE,):
                for m in stock.FindServiceByName(s).methods:
                    GetMessageClass(m.input_type)
                    GetMessageClass(m.output_type)
                    methods += 1
        except (KeyError, TypeError, grpc.RpcError) as e:
            fail("stock ProtoReflectionDescriptorDatabase", f"{type(e).__name__}: {e}")
        ok("stock ProtoReflectionDescriptorDatabase (v1alpha)", f"{methods} methods resolved")

    client = Client(channel, schema)

    # -- health
    serving = schema.enum_number("grpc.health.v1.HealthCheckResponse.ServingStatus", "SERVING")
    for svc in ("", "lab.v1.LeaseService"):
        try:
            resp = client.unary(HEALTH_SERVICE, "Check", {"service": svc}, auth)
        except grpc.RpcError as e:
            fail(f"health {svc!r}", rpc_error_text(e))
        if resp.status != serving:
            fail(f"health {svc!r}", f"status {resp.status}, want SERVING")
        ok(f"health {svc!r}", "SERVING")

    # -- who am I
    try:
        me = client.unary("lab.v1.AdminService", "WhoAmI", {}, auth)
    except grpc.RpcError as e:
        fail("WhoAmI", rpc_error_text(e))
    role = schema.enum_name("lab.v1.Role", me.role)
    if not me.principal:
        fail("WhoAmI", "empty principal")
    if args.expect_principal and me.principal != args.expect_principal:
        fail("WhoAmI", f"principal {me.principal!r}, want {args.expect_principal!r}")
    ok("WhoAmI", f"principal={me.principal} role={role}")

    # -- hosts
    try:
        hosts = client.unary("lab.v1.HostService", "ListHosts", {}, auth)
    except grpc.RpcError as e:
        fail("ListHosts", rpc_error_text(e))
    if not hosts.hosts:
        fail("ListHosts", "no hosts")
    for h in hosts.hosts:
        print(
            f"      host {h.name} arch={schema.enum_name('lab.v1.Arch', h.arch)} "
            f"state={schema.enum_name('lab.v1.HostState', h.state)} flags={list(h.flags)}",
            flush=True,
        )
    ok("ListHosts", f"{len(hosts.hosts)} hosts")
    names = {h.name for h in hosts.hosts}

    # -- acquire (server streaming) until granted
    acquire = {"request": {"count": 1, "ttl": "60s", "profile": "xen", "comment": "python reflection client"}}
    lease = None
    updates = 0
    try:
        for upd in client.server_stream("lab.v1.LeaseService", "Acquire", acquire, auth):
            updates += 1
            kind = upd.WhichOneof("update")
            print(f"      update {kind}: {as_json(getattr(upd, kind)) if kind else '{}'}", flush=True)
            if kind == "granted":
                lease = upd.granted
                break
    except grpc.RpcError as e:
        fail("Acquire", rpc_error_text(e))
    if lease is None:
        fail("Acquire", f"stream ended after {updates} updates without a grant")
    active = schema.enum_number("lab.v1.LeaseState", "LEASE_STATE_ACTIVE")
    if lease.state != active:
        fail("Acquire", f"granted lease state {schema.enum_name('lab.v1.LeaseState', lease.state)}")
    if len(lease.hosts) != 1 or lease.hosts[0] not in names:
        fail("Acquire", f"granted hosts {list(lease.hosts)}, want one of {sorted(names)}")
    if lease.profile != "xen":
        fail("Acquire", f"profile {lease.profile!r}, want 'xen'")
    if lease.ttl.seconds != 60:
        fail("Acquire", f"ttl {lease.ttl.seconds}s, want 60s")
    if lease.holder != me.principal:
        fail("Acquire", f"holder {lease.holder!r}, want {me.principal!r}")
    if not lease.HasField("expires_at") or lease.expires_at.seconds <= lease.granted_at.seconds:
        fail("Acquire", f"bad expires_at {as_json(lease.expires_at)} (granted_at {as_json(lease.granted_at)})")
    ok("Acquire", f"lease {lease.id} granted {list(lease.hosts)} after {updates} update(s)")

    # -- release
    try:
        released = client.unary("lab.v1.LeaseService", "Release", {"lease_id": lease.id}, auth)
    except grpc.RpcError as e:
        fail("Release", rpc_error_text(e))
    state = schema.enum_name("lab.v1.LeaseState", released.state)
    if state != "LEASE_STATE_RELEASED":
        fail("Release", f"state {state}, want LEASE_STATE_RELEASED")
    if released.id != lease.id:
        fail("Release", f"released {released.id!r}, asked {lease.id!r}")
    ok("Release", f"lease {released.id} {state}")

    # -- a malformed request
    bad = {"request": {"count": 5000, "ttl": "60s", "profile": "xen"}}
    msg = expect_error(
        "Acquire count=5000",
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: client.server_stream("lab.v1.LeaseService", "Acquire", bad, auth),
        must_mention="request.count",
    )
    ok("Acquire count=5000", f"INVALID_ARGUMENT {msg!r}")

    # -- authentication
    if args.expect_auth:
        msg = expect_error(
            "ListHosts without token",
            grpc.StatusCode.UNAUTHENTICATED,
            lambda: client.unary("lab.v1.HostService", "ListHosts", {}, None),
        )
        ok("ListHosts without token", f"UNAUTHENTICATED {msg!r}")
        msg = expect_error(
            "WhoAmI with unknown token",
            grpc.StatusCode.UNAUTHENTICATED,
            lambda: client.unary(
                "lab.v1.AdminService", "WhoAmI", {}, [("authorization", "Bearer not-a-known-token")]
            ),
        )
        ok("WhoAmI with unknown token", f"UNAUTHENTICATED {msg!r}")
    channel.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", required=True, help="HOST:PORT of lab-server")
    p.add_argument("--token", required=True, help="bearer token for the calls")
    p.add_argument(
        "--expect-auth",
        action="store_true",
        help="the server has a tokens file: calls without a (known) token must be UNAUTHENTICATED",
    )
    p.add_argument(
        "--reflection",
        choices=("auto",) + REFLECTION_VERSIONS,
        default="auto",
        help="reflection protocol: auto tries v1, falls back to v1alpha and cross-checks both",
    )
    p.add_argument("--expect-principal", default="", help="WhoAmI must name this principal")
    args = p.parse_args(argv)
    try:
        run(args)
    except CheckFailed as e:
        print(f"FAIL  {e}", flush=True)
        return 1
    except grpc.RpcError as e:
        print(f"FAIL  unexpected RPC error: {rpc_error_text(e)}", flush=True)
        return 1
    print("all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
