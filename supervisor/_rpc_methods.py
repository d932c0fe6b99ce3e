"""The budget RPC's methods: the backend protocol, strict params, and errors on the wire.

Params are checked before the backend sees them (types, known names, non-negative
integers, USD with at most 6 decimals, cached and reasoning counts within their totals),
so bad input can never change the ledger. Backend exceptions map to JSON-RPC errors here.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, Protocol

from . import _jsonrpc as j
from .errors import (
    BudgetExceeded,
    RateLimited,
    StoreUnavailable,
    UnknownModel,
    UnknownReservation,
)

MAX_INT = 10**15  # tokens and bytes: far above any real call, far below trouble
MAX_USD = Decimal(10**9)
MAX_STR = 256
MAX_PATH = 4096
_SURROGATE = re.compile("[\ud800-\udfff]")


class Backend(Protocol):
    """What the server dispatches to (the budget ledger, through the run's adapter).

    Results are JSON-able dicts (``Decimal`` allowed). Raise ``BudgetExceeded`` (error 1)
    or ``RateLimited`` (error 2) to deny; ``LookupError`` for an unknown or settled
    reservation and ``ValueError`` for a request the backend refuses (-32602);
    ``NotImplementedError`` for a method this run does not offer (-32601). Anything else
    is an internal error (-32603).
    """

    def reserve(
        self,
        *,
        model: str,
        provider: str | None,
        input_tokens: int,
        max_output_tokens: int,
        usd: Decimal | None,
        label: str | None,
        key: str | None,
    ) -> dict[str, Any]: ...

    def commit(
        self,
        reservation: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int,
        cache_write_tokens: int,
        reasoning_tokens: int,
        usd: Decimal | None,
    ) -> dict[str, Any]: ...

    def release(self, reservation: str) -> dict[str, Any]: ...

    def record(
        self,
        *,
        model: str,
        provider: str | None,
        label: str | None,
        key: str | None,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int,
        cache_write_tokens: int,
        reasoning_tokens: int,
        usd: Decimal | None,
    ) -> dict[str, Any]: ...

    def usage(self) -> dict[str, Any]: ...

    def check_write(self, path: str, size: int) -> dict[str, Any]: ...

    def step_begin(self, name: str) -> dict[str, Any]: ...

    def step_end(self, name: str) -> dict[str, Any]: ...


class InvalidParams(ValueError):
    """The params of a request are not what its method takes (-32602)."""


# name -> (kind, default); a default of ... means required.
_Spec = dict[str, tuple[str, Any]]
_COUNTS: _Spec = {
    "input_tokens": ("int", ...),
    "output_tokens": ("int", ...),
    "cached_input_tokens": ("int", 0),
    "cache_write_tokens": ("int", 0),
    "reasoning_tokens": ("int", 0),
    "usd": ("usd", None),
}
_WHO: _Spec = {
    "model": ("str", ...),
    "provider": ("optstr", None),
    "label": ("optstr", None),
    "key": ("optstr", None),
}
# method -> (names passed positionally, spec)
METHODS: dict[str, tuple[tuple[str, ...], _Spec]] = {
    "reserve": (
        (),
        {
            **_WHO,
            "input_tokens": ("int", 0),
            "max_output_tokens": ("int", 0),
            "usd": ("usd", None),
        },
    ),
    "commit": (("reservation",), {"reservation": ("str", ...), **_COUNTS}),
    "release": (("reservation",), {"reservation": ("str", ...)}),
    "record": ((), {**_WHO, **_COUNTS}),
    "usage": ((), {}),
    "check_write": (("path", "size"), {"path": ("path", ...), "size": ("int", ...)}),
    "step_begin": (("name",), {"name": ("str", ...)}),
    "step_end": (("name",), {"name": ("str", ...)}),
}


def _check(name: str, kind: str, value: object) -> object:
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidParams(f"{name} must be an integer, not {_show(value)}")
        if not 0 <= value <= MAX_INT:
            raise InvalidParams(f"{name} must be between 0 and {MAX_INT}, not {value}")
        return value
    if kind == "usd":
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = Decimal(value)
        if not isinstance(value, Decimal) or not value.is_finite():
            raise InvalidParams(f"{name} must be a number of USD, not {_show(value)}")
        if not 0 <= value <= MAX_USD:
            raise InvalidParams(f"{name} must be between 0 and {MAX_USD}, not {value}")
        if value != value.quantize(Decimal("0.000001")):
            raise InvalidParams(f"{name} has more than 6 decimals (micro-USD): {value}")
        return value
    if kind == "optstr" and value is None:
        return None
    if not isinstance(value, str):
        raise InvalidParams(f"{name} must be a string, not {_show(value)}")
    limit = MAX_PATH if kind == "path" else MAX_STR
    if len(value) > limit:
        raise InvalidParams(f"{name} is longer than {limit} characters")
    if kind != "optstr" and not value:
        raise InvalidParams(f"{name} must not be empty")
    if "\0" in value:
        raise InvalidParams(f"{name} contains a NUL character")
    if not value.isascii() and _SURROGATE.search(value):
        # JSON can escape half of a UTF-16 pair ("\ud800"); no name or file holds one.
        raise InvalidParams(f"{name} contains a lone surrogate (send whole characters)")
    return value


def _show(value: object) -> str:
    if isinstance(value, Decimal) and not -40 < value.adjusted() < 40:
        text = str(value)  # 1E+999999999: as JSON it would be a billion digits
    elif isinstance(value, int | str | Decimal | None):
        text = j.dumps(value)
    else:
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def validate(method: str, params: object) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments for the backend, or ``InvalidParams``."""
    positional, spec = METHODS[method]
    if isinstance(params, list) and not params:
        params = {}
    if not isinstance(params, dict):
        raise InvalidParams("params must be an object of named params")
    unknown = sorted(set(params) - set(spec))
    if unknown:
        raise InvalidParams(f"unknown params {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, (kind, default) in spec.items():
        if name in params:
            values[name] = _check(name, kind, params[name])
        elif default is ...:
            raise InvalidParams(f"{name} is required")
        else:
            values[name] = default
    if "output_tokens" in values:
        if values["cached_input_tokens"] + values["cache_write_tokens"] > values["input_tokens"]:
            raise InvalidParams(
                "cached_input_tokens + cache_write_tokens must not exceed input_tokens "
                "(input_tokens counts every input token, cached ones included)"
            )
        if values["reasoning_tokens"] > values["output_tokens"]:
            raise InvalidParams("reasoning_tokens must not exceed output_tokens (a subset)")
    args = tuple(values.pop(name) for name in positional)
    return args, values


def call(
    backend: Backend, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[dict[str, Any] | None, tuple[int, str, object] | None]:
    """Run one validated call: ``(result, None)`` or ``(None, (code, message, data))``."""
    fn = getattr(backend, method, None)
    if fn is None:
        return None, (j.METHOD_NOT_FOUND, f"{method} is not available in this run", None)
    try:
        result = fn(*args, **kwargs)
        if not isinstance(result, dict):
            raise TypeError(f"the backend's {method} returned {type(result).__name__}")
    except BudgetExceeded as e:
        data = {
            "limit": e.limit,
            "scope": e.scope,
            "used": e.used,
            "held": e.held,
            "limit_value": e.limit_value,
            "requested": getattr(e, "requested", 0),
            "key": getattr(e, "key", ""),
        }
        return None, (j.BUDGET_EXCEEDED, e.message, data)
    except RateLimited as e:
        rate = {"retry_after": e.retry_after, "limit": e.limit, "used": e.used}
        return None, (j.RATE_LIMITED, e.message, {**rate, "limit_value": e.limit_value})
    except StoreUnavailable as e:  # fail closed: a denial, never free spend
        denial = {"limit": None, "scope": "store", "used": None, "held": None}
        return None, (j.BUDGET_EXCEEDED, e.message, {**denial, "limit_value": None})
    except UnknownModel as e:  # a budget decision (unknown_model: deny), not bad input
        model: dict[str, object] = {"limit": "model", "scope": "model", "key": e.model}
        zero = {"used": 0, "held": 0, "limit_value": 0}
        return None, (j.BUDGET_EXCEEDED, f"{method}: {e}", {**model, **zero})
    except UnknownReservation as e:
        return None, (j.INVALID_PARAMS, f"{method}: {e}", None)
    except NotImplementedError as e:
        detail = f": {e}" if str(e) else ""
        return None, (j.METHOD_NOT_FOUND, f"{method} is not available in this run{detail}", None)
    except (LookupError, ValueError) as e:
        text = e.args[0] if isinstance(e, KeyError) and e.args else e
        return None, (j.INVALID_PARAMS, f"{method}: {text}", None)
    except Exception as e:  # a backend bug must not take the supervisor down
        return None, (j.INTERNAL_ERROR, f"{method}: internal error: {e!r}", None)
    return result, None
