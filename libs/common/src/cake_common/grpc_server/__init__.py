"""gRPC server bootstrap: health, reflection, interceptors, graceful shutdown.

Typical use (in a service's composition root)::

    running = await (
        GrpcServerBuilder.from_settings(settings, service_names=[AUTH_SERVICE])
        .add_servicer(lambda server: add_AuthServiceServicer_to_server(servicer, server))
        .with_auth(verifier, is_revoked=revocations.is_revoked)  # access: from the protos
        .with_validation()
        .add_dependency_check(DependencyCheck("postgres", database_probe(engine)))
        .add_shutdown_hook(engine.dispose)
        .start()
    )
    await running.serve_until_signal()
"""

from cake_common.auth_context import current_principal, principal_var, require_admin
from cake_common.grpc_server.auth import ALWAYS_PUBLIC_SERVICES, AuthInterceptor, RevocationCheck
from cake_common.grpc_server.call_scope import (
    CallScope,
    ScopedInterceptorChain,
    ScopedServerInterceptor,
    ServicerContext,
)
from cake_common.grpc_server.health import (
    DATABASE_CHECK,
    LIVENESS_HEALTH,
    OVERALL_HEALTH,
    ComponentStatus,
    DependencyCheck,
    DependencyProbe,
    DependencyWatcher,
    ServiceHealth,
)
from cake_common.grpc_server.interceptors import (
    DEFAULT_UNAVAILABLE_ERRORS,
    REQUEST_ID_METADATA_KEY,
    ErrorMappingInterceptor,
    RequestIdEcho,
    RequestIdInterceptor,
    ValidationInterceptor,
    add_response_header,
)
from cake_common.grpc_server.metrics import (
    GrpcServerMetrics,
    MetricsInterceptor,
    grpc_server_metrics,
)
from cake_common.grpc_server.rich_status import abort_with_error, rich_status_for
from cake_common.grpc_server.server import (
    GrpcServerBuilder,
    RunningGrpcServer,
    ServicerRegistration,
    run_grpc_server,
)
from cake_common.lifecycle import ShutdownHook

__all__ = [
    "ALWAYS_PUBLIC_SERVICES",
    "DATABASE_CHECK",
    "DEFAULT_UNAVAILABLE_ERRORS",
    "LIVENESS_HEALTH",
    "OVERALL_HEALTH",
    "REQUEST_ID_METADATA_KEY",
    "AuthInterceptor",
    "CallScope",
    "ComponentStatus",
    "DependencyCheck",
    "DependencyProbe",
    "DependencyWatcher",
    "ErrorMappingInterceptor",
    "GrpcServerBuilder",
    "GrpcServerMetrics",
    "MetricsInterceptor",
    "RequestIdEcho",
    "RequestIdInterceptor",
    "RevocationCheck",
    "RunningGrpcServer",
    "ScopedInterceptorChain",
    "ScopedServerInterceptor",
    "ServiceHealth",
    "ServicerContext",
    "ServicerRegistration",
    "ShutdownHook",
    "ValidationInterceptor",
    "abort_with_error",
    "add_response_header",
    "current_principal",
    "grpc_server_metrics",
    "principal_var",
    "require_admin",
    "rich_status_for",
    "run_grpc_server",
]
