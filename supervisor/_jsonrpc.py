"""JSON for the budget RPC, shared by both ends: one object per line, exact numbers.

Every non-integer number is read as a ``Decimal`` (money stays exact: micro-USD never go
through a float) and a ``Decimal`` is written as a plain JSON number. The child imports this
module, so it stays light: it drives the C scanner of ``_json`` directly instead of importing
``json`` (whose ``re`` and ``enum`` imports cost several ms), and imports ``decimal`` only when
a non-integer number actually shows up.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000  # the server's own trouble with a connection (overflow, too many)
BUDGET_EXCEEDED = 1
RATE_LIMITED = 2

_Decimal: Callable[[str], object] | None = None


def _to_decimal(text: str) -> object:
    global _Decimal
    if _Decimal is None:
        from decimal import Decimal

        _Decimal = Decimal
    try:
        return _Decimal(text)
    except ArithmeticError:
        # An exponent past 10**18 (1e1000000000000000000) is InvalidOperation, which the
        # caller, expecting ValueError for bad JSON, would not catch.
        shown = text if len(text) <= 30 else text[:27] + "..."
        raise ValueError(f"the number {shown} is out of range") from None


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


class _Context:
    """What the C scanner reads from a JSONDecoder: ours needs no ``json`` import."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = staticmethod(_to_decimal)
    parse_int = int
    parse_constant = staticmethod(_no_constant)
    memo: dict[str, str] = {}


try:
    from _json import encode_basestring_ascii as _quote
    from _json import make_scanner as _make_scanner

    # typeshed types the context as a scanner; any object with these attributes works.
    _scan: Callable[[str, int], tuple[object, int]] = _make_scanner(_Context())  # type: ignore[arg-type]  # ^
except ImportError:  # pragma: no cover - interpreters without the C accelerator
    import json as _json_mod

    _decoder = _json_mod.JSONDecoder(parse_float=_to_decimal, parse_constant=_no_constant)

    def _scan(text: str, idx: int) -> tuple[object, int]:
        try:
            return _decoder.raw_decode(text, idx)
        except _json_mod.JSONDecodeError as e:
            raise StopIteration(e.pos) from None

    _quote = _json_mod.encoder.encode_basestring_ascii


def loads(data: bytes | str) -> object:
    """One JSON value; ValueError (or RecursionError) when it is not exactly one."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    text = text.strip(" \t\r\n")
    try:
        try:
            value, end = _scan(text, 0)
        except SystemError:
            # The C scanner reports errors inside strings through json.decoder, which it
            # only finds when imported; import it now (only bad input pays) and scan again.
            import json.decoder  # noqa: F401  (imported for its side effect, above)

            try:
                value, end = _scan(text, 0)
            except SystemError:
                raise ValueError("invalid JSON") from None
    except StopIteration as e:
        raise ValueError(f"invalid JSON at character {e.value}") from None
    if end != len(text):
        raise ValueError(f"extra data after JSON at character {end}")
    return value


def dumps(value: object) -> str:
    """Compact JSON; a ``Decimal`` becomes a plain number, a non-finite number an error."""
    out: list[str] = []
    _encode(value, out.append)
    return "".join(out)


def _encode(value: object, write: Callable[[str], object]) -> None:
    if value is None:
        write("null")
    elif value is True:
        write("true")
    elif value is False:
        write("false")
    elif isinstance(value, str):
        write(_quote(value))
    elif isinstance(value, int):
        write(int.__repr__(value))
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value!r} is not a JSON number")
        write(float.__repr__(value))
    elif isinstance(value, dict):
        write("{")
        first = True
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be str, not {type(key).__name__}")
            if not first:
                write(",")
            first = False
            write(_quote(key))
            write(":")
            _encode(item, write)
        write("}")
    elif isinstance(value, list | tuple):
        write("[")
        for i, item in enumerate(value):
            if i:
                write(",")
            _encode(item, write)
        write("]")
    else:
        decimal = sys.modules.get("decimal")
        if decimal is not None and isinstance(value, decimal.Decimal):
            if not value.is_finite():
                raise ValueError(f"{value} is not a JSON number")
            write(format(value, "f"))
        else:
            raise TypeError(f"{type(value).__name__} is not JSON serializable")


def line(value: object) -> bytes:
    """``value`` as one line of the wire format."""
    return (dumps(value) + "\n").encode("ascii")
