"""End-to-end observability through the real stack (gateway → services → Kafka → services).

- Metrics: a scripted flow (register, first login, voucher issued asynchronously, top-up
  with that voucher) moves the business and gRPC counters on each service's ``/metrics``
  endpoint by exactly what the flow did. Counters are shared with every earlier test of the
  session, so only the deltas between a scrape before and one after are asserted.
- Traces: with the services exporting OTLP to a receiver in this process, one first login
  produces the login's server span (auth), the relay's publish span (events), the
  enrollment span (promotions), the voucher's notification and its e-mail's send span
  (notifications) in ONE trace.

The admin token is signed with the stack's development key (as ``cake-auth`` would) rather
than made by logging in: an admin's login is itself a first login, whose asynchronous
enrollment could land inside the measured window.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from cake_devtools.stack import Stack
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

TRACED_SERVICES = ("auth", "promotions", "events", "notifications")
PASSWORD = "s3cret-pass"
FLOW_WAIT_SECONDS = 60
AUTH_SERVICE = "cake.auth.v1.AuthService"
PROMOTIONS_SERVICE = "cake.promotions.v1.PromotionsService"

T = TypeVar("T")


# -- gateway flow --------------------------------------------------------------------------------


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class User:
    username: str
    phone: str
    token: str = ""

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}


def wait_for(fetch: Callable[[], T | None], *, what: str, timeout: float = FLOW_WAIT_SECONDS) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        time.sleep(0.3)


def register(client: httpx.Client) -> User:
    username = f"obs_{uuid.uuid4().hex[:10]}"
    user = User(username=username, phone="+849" + str(uuid.uuid4().int)[:9])
    response = client.post(
        "/auth/register",
        json={
            "fullname": "Observability Tester",
            "email": f"{username}@example.com",
            "username": username,
            "phone": user.phone,
            "password": PASSWORD,
            "birthday": "1990-04-01",
        },
    )
    assert response.status_code == 201, response.text
    return user


def first_login(client: httpx.Client, user: User) -> None:
    response = client.post("/auth/login", json={"account": user.username, "password": PASSWORD})
    assert response.status_code == 200, response.text
    user.token = response.json()["access_token"]


@pytest.fixture
def client(full_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=full_stack.gateway_url, timeout=30) as http:
        yield http


@pytest.fixture
def campaign(client: httpx.Client, admin_token: str) -> Iterator[dict[str, Any]]:
    """A running first-login campaign, the newest one, so this test's login enrolls into it
    (earlier tests' campaigns may be full). Set inactive afterwards."""
    admin = {"authorization": f"Bearer {admin_token}"}
    now = datetime.now(UTC)
    body = {
        "name": f"observability campaign {uuid.uuid4().hex[:10]}",
        "description": "created by tests/e2e/test_observability.py",
        "type": "first_login_discount",
        "startDate": iso(now - timedelta(minutes=1)),
        "endDate": iso(now + timedelta(days=1)),
        "maxParticipants": 100000,
        "discountPercentage": 30,
        "minTopupAmount": 50000,
        "maxDiscountAmount": 20000,
        "voucherValidityDays": 30,
    }
    response = client.post("/promotions/campaigns", json=body, headers=admin)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    yield created
    client.patch(
        f"/promotions/campaigns/{created['id']}/status",
        json={"status": "inactive"},
        headers=admin,
    )


# -- metrics -------------------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples | None:
    """Every sample of ``http://127.0.0.1:port/metrics``, or ``None`` if nothing answers."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except httpx.TransportError:
        return None
    response.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 if there is none)."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


@pytest.fixture
def metrics_ports(full_stack: Stack) -> dict[str, int]:
    """Each service's metrics port, restarting a service that was started before the stack
    set ``CAKE_<SVC>_METRICS_PORT`` (``up`` leaves healthy services alone)."""
    environment = full_stack.service_environment()
    ports = {
        name: int(environment[name][f"CAKE_{name.upper()}_METRICS_PORT"])
        for name in TRACED_SERVICES
    }
    for name, port in ports.items():
        if scrape(port) is None:
            full_stack.down([name])
            full_stack.up([name])
            assert scrape(port) is not None, f"{name} serves no metrics on port {port}"
    return ports


def scrape_all(ports: Mapping[str, int]) -> dict[str, Samples]:
    scraped = {}
    for name, port in ports.items():
        samples = scrape(port)
        assert samples is not None, f"{name} metrics on port {port} did not answer"
        scraped[name] = samples
    return scraped


class Deltas:
    def __init__(self, before: Mapping[str, Samples], after: Mapping[str, Samples]) -> None:
        self._before, self._after = before, after

    def __call__(self, service: str, name: str, **labels: str) -> float:
        return value(self._after[service], name, **labels) - value(
            self._before[service], name, **labels
        )

    def handled(self, service: str, grpc_service: str, method: str) -> float:
        return self(
            service,
            "grpc_server_handled_total",
            grpc_service=grpc_service,
            grpc_method=method,
            grpc_code="OK",
        )


# The flow writes USER_FIRST_LOGIN to auth's outbox and PROMOTION_ENROLLMENT, VOUCHER_ISSUED,
# VOUCHER_USED and PAYMENT_PROCESSED to promotions'; the relay publishes them asynchronously.
FLOW_EVENTS_BY_SOURCE = {"auth": 1, "promotions": 4}


def test_a_scripted_flow_moves_every_counter_by_what_it_did(
    full_stack: Stack,
    client: httpx.Client,
    campaign: dict[str, Any],
    metrics_ports: dict[str, int],
) -> None:
    before = scrape_all(metrics_ports)

    user = register(client)
    first_login(client, user)

    def vouchers() -> list[dict[str, Any]]:
        response = client.get("/promotions/my-vouchers", headers=user.auth)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    (voucher,) = wait_for(vouchers, what=f"a voucher for {user.username}")
    promotions = client.get("/promotions/my-promotions", headers=user.auth)
    assert promotions.status_code == 200, promotions.text
    assert [p["campaignId"] for p in promotions.json()] == [campaign["id"]]
    paid = client.post(
        "/promotions/topup",
        json={"phoneNumber": user.phone, "amount": 100000, "voucherCode": voucher["code"]},
        headers={**user.auth, "idempotency-key": str(uuid.uuid4())},
    )
    assert paid.status_code == 200, paid.text
    assert paid.json()["success"] is True

    def relayed() -> Deltas | None:
        deltas = Deltas(before, scrape_all(metrics_ports))
        published = {
            source: deltas("events", "cake_events_relay_published_total", source=source)
            for source in FLOW_EVENTS_BY_SOURCE
        }
        done = all(published[s] >= n for s, n in FLOW_EVENTS_BY_SOURCE.items())
        return deltas if done else None

    delta = wait_for(relayed, what="the relay publishing the flow's events")

    assert delta("auth", "cake_auth_registrations_total", result="created") == 1
    assert delta("auth", "cake_auth_logins_total", result="success") == 1
    assert delta("auth", "cake_auth_logins_total", result="invalid_credentials") == 0
    assert delta("auth", "cake_auth_first_logins_total") == 1
    assert delta("promotions", "cake_promotions_enrollments_total", result="enrolled") == 1
    assert delta("promotions", "cake_promotions_enrollments_total") == 1
    assert delta("promotions", "cake_promotions_vouchers_issued_total") == 1
    assert delta("promotions", "cake_promotions_vouchers_used_total") == 1
    assert delta("promotions", "cake_promotions_topups_total", result="succeeded") == 1
    assert delta("promotions", "cake_promotions_topups_total") == 1
    assert delta("promotions", "cake_promotions_consumed_events_total") >= 1
    for source, count in FLOW_EVENTS_BY_SOURCE.items():
        assert delta("events", "cake_events_relay_published_total", source=source) >= count
    assert delta("events", "cake_events_relay_dead_lettered_total") == 0

    assert delta.handled("auth", AUTH_SERVICE, "Register") == 1
    assert delta.handled("auth", AUTH_SERVICE, "Login") == 1
    assert delta.handled("promotions", PROMOTIONS_SERVICE, "ListMyVouchers") >= 1
    assert delta.handled("promotions", PROMOTIONS_SERVICE, "Topup") == 1
    assert delta("auth", "grpc_server_handled_total", grpc_code="INTERNAL") == 0
    assert delta("promotions", "grpc_server_handled_total", grpc_code="INTERNAL") == 0


# -- traces --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str


class SpanCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver keeping every span in memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            service = next(
                (
                    attribute.value.string_value
                    for attribute in resource_spans.resource.attributes
                    if attribute.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                received += [
                    ReceivedSpan(service, span.name, span.kind, span.trace_id.hex())
                    for span in scope_spans.spans
                ]
        with self._lock:
            self._spans += received
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)


@pytest.fixture
def span_collector() -> Iterator[tuple[SpanCollector, str]]:
    """The receiver and its endpoint. A thread-pool server, not ``grpc.aio``: stopping the
    services blocks this thread while they flush their last spans to it."""
    collector = SpanCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        collector, server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collector, f"http://127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.fixture
def traced_services(
    full_stack: Stack, span_collector: tuple[SpanCollector, str]
) -> Iterator[SpanCollector]:
    """auth, promotions and events restarted exporting traces to the collector; restarted
    again without tracing afterwards, so later tests run as before."""
    collector, endpoint = span_collector
    overrides = {
        "CAKE_TEST_OTLP_ENDPOINT": endpoint,
        # The batch span processor exports every 5 s by default; sooner keeps the test short.
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    saved = {name: os.environ.get(name) for name in overrides}
    try:
        os.environ.update(overrides)
        # A fresh Stack: settings (the OTLP endpoint) are read when one is made.
        restart(Stack(profile="test", echo=None))
        yield collector
    finally:
        for name, previous in saved.items():
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous
        restart(Stack(profile="test", echo=None))


def restart(stack: Stack) -> None:
    stack.down(list(TRACED_SERVICES))
    stack.up(list(TRACED_SERVICES))


def test_a_first_login_is_one_trace_from_login_through_the_relay_to_the_enrollment(
    client: httpx.Client, campaign: dict[str, Any], traced_services: SpanCollector
) -> None:
    user = register(client)
    first_login(client, user)

    def one_trace() -> str | None:
        spans = traced_services.spans()
        logins = {
            span.trace_id
            for span in spans
            if span.service == "auth"
            and span.name.endswith(f"{AUTH_SERVICE}/Login")
            and span.kind == trace_pb2.Span.SPAN_KIND_SERVER
        }
        published = {
            span.trace_id
            for span in spans
            if span.service == "events"
            and span.name == "cake.auth.user.v1 publish"
            and span.kind == trace_pb2.Span.SPAN_KIND_PRODUCER
        }
        enrolled = {
            span.trace_id
            for span in spans
            if span.service == "promotions" and span.name == "promotions enroll first login"
        }
        # The enrollment's own events (voucher issued) continue the same trace.
        voucher_published = {
            span.trace_id
            for span in spans
            if span.service == "events" and span.name == "cake.promotions.voucher.v1 publish"
        }
        # ...and so do the voucher's notification and its e-mail.
        notified = {
            span.trace_id
            for span in spans
            if span.service == "notifications" and span.name == "notifications voucher issued"
        }
        emailed = {
            span.trace_id
            for span in spans
            if span.service == "notifications" and span.name == "notifications send email"
        }
        # Only this test logs in while the services export here (it restarted them), so
        # any complete trace is this login's.
        shared = logins & published & enrolled & voucher_published & notified & emailed
        return min(shared) if shared else None

    trace_id = wait_for(
        one_trace, what="login, relay, enrollment, notification and e-mail spans in one trace"
    )

    in_trace = {(s.service, s.name) for s in traced_services.spans() if s.trace_id == trace_id}
    assert ("auth", f"/{AUTH_SERVICE}/Login") in in_trace
    assert ("events", "cake.auth.user.v1 publish") in in_trace
    assert ("promotions", "promotions enroll first login") in in_trace
    assert ("events", "cake.promotions.voucher.v1 publish") in in_trace
    assert ("notifications", "notifications voucher issued") in in_trace
    assert ("notifications", "notifications send email") in in_trace
