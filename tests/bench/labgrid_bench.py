#!/usr/bin/env python3
"""Acquire+release round trips against labgrid's coordinator, for comparison
with `lease-bench` (tests/src/bin/lease-bench.rs). See README.md beside this
file for installing labgrid.

For each client count a fresh `labgrid-coordinator` is started on 127.0.0.1
(loopback only, a free port) in a temporary directory, N places carrying the
tag pool=bench are created, and each client (its own ClientSession, i.e. its
own gRPC channel and place-update stream) loops for --duration:

    CreateReservation(filter pool=bench)      the coordinator's wait queue
    wait until the reservation is allocated   place updates on the session's
                                              stream; PollReservation every
                                              --poll seconds as a fallback
    AcquirePlace + sync_with_coordinator      as `labgrid-client acquire` does
    ReleasePlace + sync_with_coordinator      as `labgrid-client release` does
    CancelReservation

grant = CreateReservation sent -> AcquirePlace done (includes the wait in the
queue); release = ReleasePlace + CancelReservation; rt = the whole loop.
Every number printed is measured in this run.
"""

import argparse
import asyncio
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

try:
    from labgrid.remote.client import ClientSession
    from labgrid.remote.generated import labgrid_coordinator_pb2 as pb
    from labgrid.remote.generated import labgrid_coordinator_pb2_grpc
    import grpc
    import labgrid
except ImportError as e:  # pragma: no cover - depends on the environment
    sys.exit(f"labgrid_bench.py: labgrid is not installed ({e}); see tests/bench/README.md")


def percentile(sorted_values, p):
    """The same rule as lab_tests::percentile: index round((n-1)*p)."""
    if not sorted_values:
        return 0.0
    i = int(round((len(sorted_values) - 1) * p))
    return sorted_values[min(i, len(sorted_values) - 1)]


def ms(seconds):
    v = seconds * 1000.0
    if v < 10:
        return f"{v:.2f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:.0f}"


def proc_cpu(pid):
    """utime + stime of a process, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def own_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_pct(a, b, wall):
    if a is None or b is None or wall <= 0:
        return "-"
    return f"{100.0 * (b - a) / wall:.0f}%"


class Coordinator:
    """labgrid-coordinator on 127.0.0.1:<free port>, in a temporary directory."""

    def __init__(self):
        self.dir = tempfile.TemporaryDirectory(prefix="labgrid-bench-")
        self.log_path = os.path.join(self.dir.name, "coordinator.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from labgrid.remote.coordinator import main; main()", "--listen", "127.0.0.1:0"],
            cwd=self.dir.name,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.address = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(self.log_path) as f:
                for line in f:
                    if line.startswith("listening on "):
                        self.address = line.split()[-1]
            if self.address:
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if not self.address:
            self.stop()
            with open(self.log_path) as f:
                raise RuntimeError(f"labgrid-coordinator did not start:\n{f.read()}")
        if not self.address.startswith("127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"coordinator listens on {self.address}, not loopback")

    def cpu(self):
        return proc_cpu(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.dir.cleanup()


class BenchSession(ClientSession):
    """A ClientSession with its own user name that wakes waiters on place updates."""

    def getuser(self):
        return self.bench_user

    def gethostname(self):
        return "lease-bench"

    async def on_place_changed(self, place_pb2):
        await super().on_place_changed(place_pb2)
        self.place_event.set()


async def open_session(address, user):
    s = BenchSession(address=address, loop=asyncio.get_running_loop())
    # gRPC Python shares one connection between channels of the same target
    # and options (the global subchannel pool), and the coordinator keys its
    # sessions by peer address: give each session its own connection, as
    # separate labgrid-client processes would have.
    await s.channel.close()
    s.channel = grpc.aio.insecure_channel(
        target=address,
        options=[
            ("grpc.keepalive_time_ms", 7500),
            ("grpc.keepalive_timeout_ms", 10000),
            ("grpc.http2.ping_timeout_ms", 10000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )
    s.stub = labgrid_coordinator_pb2_grpc.CoordinatorStub(s.channel)
    s.bench_user = user
    s.place_event = asyncio.Event()
    await s.start()
    return s


def allocated_place(session, token, reservation=None):
    if reservation is not None and reservation.allocations.get("main"):
        return reservation.allocations["main"]
    for name, place in session.places.items():
        if place.reservation == token:
            return name
    return None


FILTER = {"main": pb.Reservation.Filter(filter={"pool": "bench"})}


async def round_trip(s, poll):
    t0 = time.perf_counter()
    res = (await s.stub.CreateReservation(pb.CreateReservationRequest(filters=FILTER, prio=0))).reservation
    token = res.token
    place = allocated_place(s, token, res)
    polls = 0
    while place is None:
        s.place_event.clear()
        place = allocated_place(s, token)
        if place is not None:
            break
        try:
            await asyncio.wait_for(s.place_event.wait(), poll)
        except asyncio.TimeoutError:
            polls += 1
            res = (await s.stub.PollReservation(pb.PollReservationRequest(token=token))).reservation
            place = allocated_place(s, token, res)
            continue
        place = allocated_place(s, token)
    await s.stub.AcquirePlace(pb.AcquirePlaceRequest(placename=place))
    await s.sync_with_coordinator()
    grant = time.perf_counter() - t0
    t1 = time.perf_counter()
    await s.stub.ReleasePlace(pb.ReleasePlaceRequest(placename=place))
    await s.sync_with_coordinator()
    await s.stub.CancelReservation(pb.CancelReservationRequest(token=token))
    end = time.perf_counter()
    return grant, end - t1, end - t0, polls


async def round_trip_direct(s, poll):
    """No reservation: AcquirePlace on a place this session sees free; on a
    conflict (another client was faster) wait for a place update and retry."""
    t0 = time.perf_counter()
    conflicts = 0
    while True:
        free = [n for n, p in s.places.items() if p.acquired is None and p.reservation is None]
        if not free:
            s.place_event.clear()
            try:
                await asyncio.wait_for(s.place_event.wait(), poll)
            except asyncio.TimeoutError:
                pass
            continue
        place = random.choice(free)
        try:
            await s.stub.AcquirePlace(pb.AcquirePlaceRequest(placename=place))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            conflicts += 1
            # Our view is stale: let the update that took the place arrive.
            await s.sync_with_coordinator()
            continue
        await s.sync_with_coordinator()
        break
    grant = time.perf_counter() - t0
    t1 = time.perf_counter()
    await s.stub.ReleasePlace(pb.ReleasePlaceRequest(placename=place))
    await s.sync_with_coordinator()
    end = time.perf_counter()
    return grant, end - t1, end - t0, conflicts


async def client_loop(s, start_evt, duration, poll, trip):
    await start_evt.wait()
    deadline = time.perf_counter() + duration
    samples, errors = [], []
    while time.perf_counter() < deadline:
        try:
            samples.append(await trip(s, poll))
        except Exception as e:  # noqa: BLE001 - counted and shown
            errors.append(f"{type(e).__name__}: {e}")
            if len(errors) > 100:
                break
    return samples, errors


async def run_row(n, places, duration, poll, mode):
    trip = round_trip if mode == "reserve" else round_trip_direct
    coord = Coordinator()
    sessions = []
    try:
        admin = await open_session(coord.address, "bench-admin")
        sessions.append(admin)
        for i in range(places):
            name = f"p{i:02d}"
            await admin.stub.AddPlace(pb.AddPlaceRequest(name=name))
            await admin.stub.SetPlaceTags(pb.SetPlaceTagsRequest(placename=name, tags={"pool": "bench"}))
        await admin.sync_with_coordinator()
        clients = []
        for i in range(n):
            clients.append(await open_session(coord.address, f"bench-c{i:03d}"))
        sessions.extend(clients)
        # Warm-up: one round trip per client, not counted.
        await asyncio.gather(*(trip(s, poll) for s in clients))
        start_evt = asyncio.Event()
        tasks = [asyncio.create_task(client_loop(s, start_evt, duration, poll, trip)) for s in clients]
        s0, c0 = coord.cpu(), own_cpu()
        t0 = time.perf_counter()
        start_evt.set()
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        s1, c1 = coord.cpu(), own_cpu()
    finally:
        for s in sessions:
            try:
                await s.stop()
                await s.close()
            except Exception:  # noqa: BLE001 - best effort teardown
                pass
        coord.stop()
    grant, rel, rt, errors = [], [], [], []
    polls = 0
    for samples, errs in results:
        errors.extend(errs)
        for g, r, t, p in samples:
            grant.append(g)
            rel.append(r)
            rt.append(t)
            polls += p
    grant.sort()
    rel.sort()
    rt.sort()
    return {
        "clients": n,
        "trips": len(rt),
        "wall": wall,
        "grant": grant,
        "rel": rel,
        "rt": rt,
        "polls": polls,
        "errors": errors,
        "srv": cpu_pct(s0, s1, wall),
        "cli": cpu_pct(c0, c1, wall),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per row [10]")
    ap.add_argument("--places", type=int, default=8, help="places in the pool [8]")
    ap.add_argument("--clients", default="1,64", help="concurrent clients per row [1,64]")
    ap.add_argument("--poll", type=float, default=1.0, help="PollReservation fallback interval, s [1.0]")
    ap.add_argument("--modes", default="reserve,direct", help="loops to run: reserve, direct [reserve,direct]")
    args = ap.parse_args()
    counts = [int(x) for x in args.clients.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    for m in modes:
        if m not in ("reserve", "direct"):
            ap.error(f"unknown mode {m!r}")
    cores = os.cpu_count()
    print(f"labgrid {labgrid.__version__} coordinator (child process, Python {sys.version.split()[0]}); "
          f"clients: one Python asyncio process, one ClientSession (gRPC channel) each")
    print(f"machine: {cores} cores | coordinator store: places.yaml written every 15 s, nothing persisted per operation "
          f"| {args.duration:g} s per row | {args.places} places (tag pool=bench) | fresh coordinator per row")
    print("latencies in ms; grant includes the wait for a free place; rt = whole round trip; "
          "srvCPU/cliCPU: coordinator / client process CPU as a share of one core")
    print("  reserve: CreateReservation(pool=bench) -> allocated -> AcquirePlace -> ReleasePlace -> CancelReservation;")
    print("           release = ReleasePlace + CancelReservation; retries = PollReservation fallbacks (no update within --poll)")
    print("  direct:  AcquirePlace on a place seen free (no queue) -> ReleasePlace; retries = AcquirePlace refused "
          "because another client was faster")
    header = (f"{'mode':<8} {'clients':>7} {'trips':>8} {'trips/s':>9} {'grant50':>7} {'grant99':>7} {'rel50':>7} "
              f"{'rel99':>7} {'rt50':>7} {'rt99':>7} {'retries':>8} {'errors':>6} {'srvCPU':>7} {'cliCPU':>7}")
    print(header)
    sys.stdout.flush()
    first_errors = []
    for mode in modes:
        for n in counts:
            r = asyncio.run(run_row(n, args.places, args.duration, args.poll, mode))
            print(f"{mode:<8} {r['clients']:>7} {r['trips']:>8} {r['trips'] / r['wall']:>9.1f} "
                  f"{ms(percentile(r['grant'], 0.5)):>7} {ms(percentile(r['grant'], 0.99)):>7} "
                  f"{ms(percentile(r['rel'], 0.5)):>7} {ms(percentile(r['rel'], 0.99)):>7} "
                  f"{ms(percentile(r['rt'], 0.5)):>7} {ms(percentile(r['rt'], 0.99)):>7} "
                  f"{r['polls']:>8} {len(r['errors']):>6} {r['srv']:>7} {r['cli']:>7}")
            sys.stdout.flush()
            if r["errors"]:
                first_errors.append(f"{mode}, {n} clients: {r['errors'][0]}")
    for e in first_errors:
        print(f"   error: {e}")
    return 1 if first_errors else 0


if __name__ == "__main__":
    sys.exit(main())
