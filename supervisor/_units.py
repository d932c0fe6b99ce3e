"""Units in policies and messages: sizes, durations and money, parsed strictly and shown short.

Parsers take what YAML gives (a number or a string) and return plain numbers: sizes in bytes
(``int``), durations in seconds (``float``), money in USD (``Decimal``, never through float).
They raise ``ValueError`` whose text is ready for the user, e.g.
``"2 gigs" is not a size (try 2GiB)``. Booleans are rejected (YAML reads ``yes`` as true)
and so are negative values, and values too large to enforce or to keep exactly: every
value a parser returns survives ``Policy.to_dict()`` (JSON) unchanged. Only the standard
library is imported here.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation

__all__ = [
    "MAX_DURATION",
    "MAX_MONEY",
    "MAX_SIZE",
    "compact_duration",
    "compact_size",
    "format_duration",
    "format_money",
    "format_size",
    "parse_duration",
    "parse_money",
    "parse_size",
    "printable",
    "show",
    "show_value",
]

# rlimits are 64-bit and RLIM_INFINITY is all ones: anything larger cannot be enforced.
MAX_SIZE = 2**63 - 1
# A century: far beyond any run, and finite (an infinite float has no YAML or JSON form).
MAX_DURATION = 100 * 365 * 86400
# The ledger counts integer micro-USD in 64 bits (SQLite INTEGER): 10**12 USD is 10**18.
MAX_MONEY = Decimal(10**12)
# Money reaches the run as a JSON number (a float): 15 significant digits survive it exactly.
_MONEY_DIGITS = 15
_MONEY_EXPONENT = -12  # the least amount: 10**-12 USD (a millionth of a micro-dollar)
# Decimal's default context traps overflow past 10**999999: larger input is refused first.
_MAX_EXPONENT = 40

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_SIZE_RE = re.compile(rf"\s*(?P<sign>[-+]?)\s*(?P<number>{_NUMBER})\s*(?P<unit>[A-Za-z]*)\s*")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "byte": 1,
    "bytes": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
    # One letter is binary, as coreutils, prlimit and docker read it (2G = 2GiB); with a B
    # it is decimal, as SPEC's units line has it (1GB = 10**9 bytes); iB is always binary.
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "p": 1024**5,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
    "pi": 1024**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
}
_BINARY = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")

_DURATION_UNITS = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "sec": Decimal(1),
    "m": Decimal(60),
    "min": Decimal(60),
    "h": Decimal(3600),
    "hr": Decimal(3600),
    "d": Decimal(86400),
}
# Longest names first, so that "ms" is not read as "m" followed by garbage.
_DURATION_UNIT_RE = "|".join(sorted(_DURATION_UNITS, key=len, reverse=True))
_DURATION_PART = re.compile(rf"\s*({_NUMBER})\s*({_DURATION_UNIT_RE})(?![a-z])")
_PLAIN_NUMBER = re.compile(rf"\s*(?P<sign>[-+]?)\s*(?P<number>{_NUMBER})\s*")
_MONEY_RE = re.compile(rf"\s*(?P<sign>-?)\s*\$?\s*(?P<sign2>-?)\s*(?P<number>{_NUMBER})\s*")

_SHORT = reprlib.Repr()  # keyword arguments only arrive in Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring = 2, 4, 4, 30
_DURATION_HINT = "try 30s, 5m"
_MONEY_HINT = 'try 5 or "$5"'


def parse_whole(value: object, example: str = "1024") -> int:
    """A whole number from YAML: an int, an integral float, or digits as text. Past 19
    digits it is too large for anything here anyway (and int() refuses 4300): it becomes
    +-2**64, for the caller's range check to refuse."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        digits = value.strip().lstrip("-").lstrip("0")
        return int(value) if len(digits) <= 19 else (-1 if "-" in value else 1) << 64
    raise ValueError(f"{show(value)} is not a whole number (try {example})")


def show(value: object) -> str:
    """Render a value the way a user wrote it, for messages: strings quoted, null, true."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value.bit_length() > 128:
        # str() of an int over 4300 digits raises; a user wants the size, not the digits.
        return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, int | float | Decimal):
        return str(value)
    if isinstance(value, str):
        text = printable(json.dumps(value, ensure_ascii=False))  # JSON leaves U+2028 as is
        return text if len(text) <= 60 else text[:56] + '..."'
    # Bounded: YAML aliases can make a small file load as a huge (or circular) structure.
    text = _SHORT.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def printable(text: str) -> str:
    """``text`` with what is not printable escaped (``\\n``, ``\\u2028``): one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in text)


def _finite(number: Decimal, value: object, what: str, hint: str, plural: str) -> Decimal:
    if not number.is_finite():
        raise ValueError(f"{show(value)} is not {what} ({hint})")
    if number < 0:
        raise ValueError(f"{show(value)} is negative ({plural} cannot be)")
    return number


def _number(value: int | float | Decimal) -> Decimal:
    # str() first: Decimal(0.1) would keep the binary float's 55 digits of noise. An int
    # converts exactly (and str() of one over 4300 digits would raise).
    if isinstance(value, Decimal):
        return value
    return Decimal(value) if isinstance(value, int) else Decimal(str(value))


def _too_large(number: Decimal) -> bool:
    """Whether ``number`` is past anything a unit can scale without overflowing Decimal."""
    return number.is_finite() and number != 0 and number.adjusted() > _MAX_EXPONENT


def parse_size(value: object) -> int:
    """Bytes from ``512``, ``"512KiB"``, ``"1.5 GiB"``, ``"2G"`` or ``"1GB"``; part of a byte
    rounds down.  Case does not matter; ``K M G T P`` alone and with ``i`` or ``iB`` are
    binary (``2G`` = ``2GiB`` = 2 * 1024**3), with ``B`` decimal (``1GB`` = 10**9)."""
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        number = _finite(_number(value), value, "a size", "try 2GiB", "sizes")
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value)
        factor = _SIZE_UNITS.get(match["unit"].lower()) if match else None
        if match is None or factor is None:
            raise ValueError(f"{show(value)} is not a size ({_size_hint(value)})")
        number = Decimal(match["number"])
        if match["sign"] == "-" and number != 0:
            raise ValueError(f"{show(value)} is negative (sizes cannot be)")
        if not _too_large(number):
            number *= factor
    else:
        raise ValueError(f"{show(value)} is not a size (try 2GiB)")
    if _too_large(number) or number > MAX_SIZE:
        raise ValueError(f"{show(value)} is too large (the most is {format_size(MAX_SIZE)})")
    return int(number.to_integral_value(rounding=ROUND_FLOOR))


def _size_hint(text: str) -> str:
    """Suggest the binary unit the user most likely meant: "2 gigs" -> 2GiB, "512M" -> 512MiB."""
    match = re.match(rf"\s*({_NUMBER})\s*([A-Za-z]?)", text)
    if match is None:
        return "try 512MiB or 2GiB"
    prefix = {"k": "Ki", "m": "Mi", "g": "Gi", "t": "Ti", "p": "Pi"}.get(match[2].lower(), "Gi")
    return f"try {match[1]}{prefix}B"


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``"250ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"1d"`` or ``"1h30m"``."""
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        seconds = _finite(_number(value), value, "a duration", _DURATION_HINT, "durations")
        negative = False
    elif not isinstance(value, str):
        raise ValueError(f"{show(value)} is not a duration ({_DURATION_HINT})")
    elif (plain := _PLAIN_NUMBER.fullmatch(value)) is not None:
        seconds = Decimal(plain["number"])
        negative = plain["sign"] == "-"
    else:
        body = value.strip()
        negative = body.startswith("-")
        body = body[1:] if negative else body
        seconds, end = Decimal(0), 0
        for part in _DURATION_PART.finditer(body):
            if part.start() != end:
                break
            number = Decimal(part[1])
            if _too_large(number):
                seconds = number  # refused below, before any arithmetic can overflow
            elif not _too_large(seconds):
                seconds += number * _DURATION_UNITS[part[2]]
            end = part.end()
        if end == 0 or body[end:].strip():
            raise ValueError(f"{show(value)} is not a duration ({_DURATION_HINT})")
    if negative and seconds != 0:
        raise ValueError(f"{show(value)} is negative (durations cannot be)")
    if _too_large(seconds) or seconds > MAX_DURATION:
        raise ValueError(f"{show(value)} is too large (the most is 36500d, a century)")
    return float(seconds)


def parse_money(value: object) -> Decimal:
    """USD as an exact Decimal from ``5``, ``0.1``, ``"5.25"`` or ``"$5"``."""
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        amount = _finite(
            _number(value), value, "an amount of money", _MONEY_HINT, "amounts of money"
        )
    else:
        match = _MONEY_RE.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            raise ValueError(f"{show(value)} is not an amount of money ({_MONEY_HINT})")
        try:
            amount = Decimal(match["number"])
        except InvalidOperation:  # pragma: no cover - the regex only lets decimal numbers through
            raise ValueError(f"{show(value)} is not an amount of money ({_MONEY_HINT})") from None
        if "-" in (match["sign"], match["sign2"]) and amount != 0:
            raise ValueError(f"{show(value)} is negative (amounts of money cannot be)")
    if amount > MAX_MONEY:
        raise ValueError(f"{show(value)} is too large (the most is $1000000000000)")
    if amount != 0 and amount.adjusted() < _MONEY_EXPONENT:
        raise ValueError(f"{show(value)} is too small (the least is 1e-12; 0 means free)")
    if len("".join(map(str, amount.as_tuple().digits)).strip("0")) > _MONEY_DIGITS:
        raise ValueError(
            f"{show(value)} has more than {_MONEY_DIGITS} significant digits "
            "(supervise keeps money exact to 15)"
        )
    return amount


def format_size(size: int) -> str:
    """Bytes for people: ``812 B``, ``512.0 MiB``, ``1.5 GiB`` (binary units, one decimal)."""
    sign, size = ("-", -size) if size < 0 else ("", size)
    if size < 1024:
        return f"{sign}{size} B"
    value = float(size)
    for unit in _BINARY:
        value /= 1024
        if value < 1024 or unit == _BINARY[-1]:
            break
    return f"{sign}{value:.1f} {unit}"


def format_duration(seconds: float) -> str:
    """Seconds for people, in the policy's own notation (which ``--set`` reads back):
    ``250ms``, ``1s``, ``3.08s``, ``5m``, ``5m30s``, ``2h30m``, ``1d4h``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if math.isinf(seconds) or math.isnan(seconds):
        return str(seconds)
    if seconds < 0.001 and seconds > 0:
        return f"{_trim(seconds * 1000, 2)}ms"
    if round(seconds * 1000) < 1000:
        return f"{round(seconds * 1000)}ms"
    if seconds < 59.995:
        return f"{_trim(seconds, 2)}s"
    total = round(seconds)
    for big, small, size in (("d", "h", 3600), ("h", "m", 60), ("m", "s", 1)):
        unit = size * {"d": 24, "h": 60, "m": 60}[big]
        if total >= unit or big == "m":
            rest = total % unit // size
            return f"{total // unit}{big}" + (f"{rest}{small}" if rest else "")
    raise AssertionError("unreachable")  # pragma: no cover


def _trim(value: float, places: int) -> str:
    """``value`` to ``places`` decimals, without trailing zeros: 3.10 -> 3.1, 15.00 -> 15."""
    return f"{value:.{places}f}".rstrip("0").rstrip(".")


def format_money(amount: Decimal) -> str:
    """USD for people: ``$5.00``, ``$0.10``, ``$1.234567`` (at least cents, at most micro-USD)."""
    rounded = amount.quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN)
    whole, _, fraction = f"{abs(rounded):f}".partition(".")
    fraction = fraction.rstrip("0").ljust(2, "0")
    return f"{'-' if rounded < 0 else ''}${whole}.{fraction}"


# Limits counted in themselves: their values need no unit word after them.
_BARE = frozenset(("calls", "tokens", "rate", "processes", "open_files", "files"))


def show_value(limit_or_unit: str | None, value: object) -> str:
    """A measured value or a limit for people: ``""`` for None; money as ``format_money``
    (``usd``); durations as ``format_duration`` (``1.5s``); else the number (a float to 6
    significant digits) and the unit after it (``2048 bytes``), none for a limit counted
    in itself (``tokens``: ``500``)."""
    if value is None:
        return ""
    if limit_or_unit == "usd" and isinstance(value, int | float | str | Decimal):
        try:
            return format_money(Decimal(str(value)))
        except (ArithmeticError, ValueError):
            pass  # not an amount (an edited log, 1e999): shown as it is below
    if limit_or_unit in ("s", "seconds") and isinstance(value, int | float):
        return format_duration(float(value))  # one style: the policy's (1.5s, 250ms, 5m)
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    if limit_or_unit and limit_or_unit != "usd" and limit_or_unit not in _BARE:
        return f"{text} {limit_or_unit}"
    return text


def compact_size(size: int) -> str | int:
    """The shortest exact way to write a size in a policy: ``2GiB``, ``1GB``, else the bytes."""
    best: str | int = size
    if size <= 0:
        return best
    for units, base in ((("kB", "MB", "GB", "TB", "PB"), 1000), (_BINARY[:5], 1024)):
        for power in range(len(units), 0, -1):
            if size % base**power == 0:
                text = f"{size // base**power}{units[power - 1]}"
                # Binary wins ties: it is what limits are usually meant in.
                if isinstance(best, int) or len(text) <= len(best):
                    best = text
                break
    return best


def compact_duration(seconds: float) -> str | float:
    """The shortest exact way to write a duration in a policy: ``10m``, ``1h30m``, ``250ms``."""
    if seconds <= 0 or not math.isfinite(seconds):
        return seconds
    rest = Decimal(repr(seconds))
    parts = []
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        count, rest = divmod(rest, length)
        if count:
            parts.append(f"{count}{unit}")
    if rest and not parts and rest < 1 and (rest * 1000) % 1 == 0:
        parts.append(f"{rest * 1000:f}".rstrip("0").rstrip(".") + "ms")
    elif rest:
        parts.append(f"{rest.normalize():f}s")
    text = "".join(parts)
    # Only use the text if it reads back as exactly the same float.
    return text if parse_duration(text) == seconds else seconds
