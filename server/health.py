"""The standard health service (grpc.health.v1), with the `List` method it advertises.

grpcio-health-checking's asyncio servicer implements Check and Watch but not List: its generated
base raises NotImplementedError, which a caller saw as INTERNAL with a traceback in the log.
"""

from __future__ import annotations

from grpc import aio
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer as _AsyncHealthServicer


class HealthServicer(_AsyncHealthServicer):
    """Check, Watch and List over one table of service statuses."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        # The parent keeps the statuses in `_server_status` (set() writes it; Check reads it).
        statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses.items()}
        )
