"""The calculator servicer: one RPC of each kind, on int32 arithmetic that never wraps."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from aigis.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from aigis.server.errors import InvalidArgument, OutOfRange

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
# F(46) = 1_836_311_903 is the last Fibonacci number that fits in int32, so at most 47 values.
FIBONACCI_MAX_COUNT = 47


def checked_int32(value: int, what: str) -> int:
    """Python ints never overflow; the wire type does, so refuse instead of wrapping."""
    if not INT32_MIN <= value <= INT32_MAX:
        raise OutOfRange(f"{what} {value} is outside the int32 range [{INT32_MIN}, {INT32_MAX}]")
    return value


class CalculatorServicer(calculator_pb2_grpc.CalculatorServicer):
    async def Add(
        self, request: calculator_pb2.AddRequest, context: aio.ServicerContext
    ) -> calculator_pb2.AddReply:
        return calculator_pb2.AddReply(sum=checked_int32(request.a + request.b, "sum"))

    async def Sum(
        self, request_iterator: AsyncIterator[calculator_pb2.Number], context: aio.ServicerContext
    ) -> calculator_pb2.SumReply:
        total = count = 0
        async for number in request_iterator:
            total = checked_int32(total + number.value, "sum")
            count += 1
        return calculator_pb2.SumReply(sum=total, count=count)

    async def Fibonacci(
        self, request: calculator_pb2.FibonacciRequest, context: aio.ServicerContext
    ) -> AsyncIterator[calculator_pb2.Number]:
        if not 0 <= request.count <= FIBONACCI_MAX_COUNT:
            raise InvalidArgument(
                f"count must be between 0 and {FIBONACCI_MAX_COUNT} (larger values overflow int32); "
                f"got {request.count}"
            )
        a, b = 0, 1
        for _ in range(request.count):
            yield calculator_pb2.Number(value=a)
            a, b = b, a + b

    async def RunningSum(
        self, request_iterator: AsyncIterator[calculator_pb2.Number], context: aio.ServicerContext
    ) -> AsyncIterator[calculator_pb2.Number]:
        total = 0
        async for number in request_iterator:
            total = checked_int32(total + number.value, "running sum")
            yield calculator_pb2.Number(value=total)
