"""Interceptor chains: code that runs around every call, on either side.

An interceptor takes what a handler takes, plus the next handler of the
chain: `interceptor(request, ctx, handler)`. It may look at the call's
context, change it (a client's metadata), call `handler(request, ctx)` and
return its answer, or fail the call by raising instead (containerd's ttrpc
has the same chains: interceptor.go).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

H = TypeVar("H", bound=Callable[..., Any])


class _Link:
    """`handler` with `interceptor` in front of it, called as the handler is.

    A plain call, not a coroutine: a link adds no await to the call.
    """

    __slots__ = ("_handler", "_interceptor")

    def __init__(self, interceptor: Callable[..., Any], handler: Callable[..., Any]) -> None:
        self._interceptor = interceptor
        self._handler = handler

    def __call__(self, request: Any, ctx: Any) -> Any:
        return self._interceptor(request, ctx, self._handler)


def chain(interceptors: Sequence[Callable[..., Any]], handler: H) -> H:
    """`handler` behind `interceptors`: the first runs first, and the `handler` it is
    given runs the rest of the chain, then `handler` itself."""
    for interceptor in reversed(interceptors):
        handler = cast(H, _Link(interceptor, handler))
    return handler
