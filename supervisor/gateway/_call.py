"""One metered call through the gateway: estimate, clamp, reserve, forward, settle once.

The input is estimated so that it is never below the real count (a token is at least one
byte of its text; images and files by reference get a generous allowance; a Responses turn
that names ``previous_response_id`` re-reads the earlier turn's tokens), the output is the
request's max tokens, clamped (or added) to what every budget scope can still pay. Denials
come back in the provider's own error shape. ``settle`` commits the provider's usage once.
"""

from __future__ import annotations

import json
import math
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from aiohttp import web

from supervisor.budget.pricing import Tokens
from supervisor.errors import BudgetError, BudgetExceeded, RateLimited, StoreUnavailable
from supervisor.gateway._policy import Provider
from supervisor.gateway._usage import WireUsage, from_json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    from aiohttp import web as _web

    from supervisor.budget.pricing import Prices

    class Gateway(Protocol):
        """What a call needs of its gateway (``_server.Gateway``)."""

        prices: Prices
        on_denied: Callable[[BudgetError | StoreUnavailable, dict[str, Any]], None] | None
        _conversations: dict[str, int]

        def backend_call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...
        def limited(self) -> bool: ...
        def price_id(self, provider: Provider) -> str: ...
        async def _forward(self, request: _web.Request, provider: Provider, body: bytes,
                           call: _Call | None) -> _web.StreamResponse: ...  # fmt: skip

    class Meter(Protocol):
        """What the gateway calls: the budget RPC's ``Backend`` less what only a child asks
        (record, check_write, steps)."""

        def reserve(self, *, model: str, provider: str | None, input_tokens: int,
                    max_output_tokens: int, usd: Decimal | None, label: str | None,
                    key: str | None) -> dict[str, Any]: ...  # fmt: skip

        def commit(self, reservation: str, *, input_tokens: int, output_tokens: int,
                   cached_input_tokens: int, cache_write_tokens: int, reasoning_tokens: int,
                   usd: Decimal | None) -> dict[str, Any]: ...  # fmt: skip

        def release(self, reservation: str) -> dict[str, Any]: ...

        def usage(self) -> dict[str, Any]: ...


DEFAULT_OUTPUT = 4096  # a hold's output when the request names none and the budget has no cap
IMAGE_TOKENS = 6400  # an image or file given by reference: more than any model charges for one
_BY_REFERENCE = ('"image_url"', '"file_id"', '"type":"image"', '"type": "image"', '"file_url"')
MAX_CONVERSATIONS = 100_000  # Responses ids remembered (their tokens), oldest dropped first
LEGACY_DEFAULT = 16  # legacy completions' max_tokens when the request names none
SEARCHES = 20  # an Anthropic web search tool without max_uses: searches held
# Output ceilings of OpenAI models by name prefix (a max tokens above them is a 400 upstream),
# used only when a request names none and the gateway must add one. Longest prefix wins.
_CEILINGS = {
    "gpt-3.5": 4096,
    "gpt-4": 8192,
    "gpt-4-turbo": 4096,
    "gpt-4o": 16384,
    "gpt-4.1": 32768,
    "gpt-5": 128000,
    "o1": 100000,
    "o3": 100000,
    "o4": 100000,
    "chatgpt-4o": 16384,
}
_DEFAULT_CEILING = 16384


class _Denied(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def _error(
    provider_kind: str, status: int, kind: str, message: str, **headers: str
) -> web.Response:
    """An error in the provider's own shape, so SDKs and agents show its message."""
    if provider_kind == "anthropic":
        akind = {
            401: "authentication_error",
            404: "not_found_error",
            429: "rate_limit_error",
            502: "api_error",
        }.get(status, "invalid_request_error")
        body: dict[str, Any] = {"type": "error", "error": {"type": akind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "param": None, "code": kind}}
    return web.json_response(body, status=status, headers=headers)


def _json_usage(kind: str, whole: bytearray | None) -> tuple[WireUsage | None, str | None]:
    """The usage of a whole JSON answer, and its id (a Responses id is a later turn's state)."""
    if not whole:
        return None, None
    try:
        body = json.loads(whole)
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    found = body.get("id")
    return from_json(kind, body), found if isinstance(found, str) else None


def _decimal(value: object) -> Decimal:
    return Decimal(str(value)) if value is not None else Decimal(0)


class _Call:
    """One metered call: estimate, clamp, reserve, forward, settle (exactly once)."""

    def __init__(
        self,
        gw: Gateway,
        request: web.Request,
        provider: Provider,
        rest: str,
        max_field: str | None,
    ) -> None:
        self.gw, self.request, self.provider, self.rest = gw, request, provider, rest
        self.max_field = max_field
        self.kind = provider.kind
        self.label = request.headers.get("x-supervise-label") or provider.name
        self.pricing = gw.price_id(provider)
        self.hold: str | None = None
        self.withhold = False
        self.input = 0
        self.output = 0
        self.tier: str | None = None
        self.clamped = False
        self.response_id: str | None = None

    async def run(self) -> web.StreamResponse:
        raw = await self.request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(
                self.kind,
                400,
                "invalid_request_error",
                "supervise gateway: the body must be a JSON object naming a model",
            )
        self.model = body["model"]
        changed = self._shape(body, raw)
        try:
            self._reserve(body)
        except _Denied as d:
            return _error(self.kind, d.status, d.kind, d.message, **d.headers)
        if changed or self.clamped:
            raw = json.dumps(body, separators=(",", ":")).encode()
        try:
            return await self.gw._forward(self.request, self.provider, raw, self)
        finally:
            self.settle(None, ok=True)  # cancelled mid-way: charge the hold, never free

    def _shape(self, body: dict[str, Any], raw: bytes) -> bool:
        """Estimate the input; ask a chat stream for its usage. True when ``body`` changed."""
        changed = False
        tokens = len(raw)  # a token is at least one byte of the text it stands for
        text = raw.decode("utf-8", "replace")
        images = sum(text.count(s) for s in _BY_REFERENCE)
        tokens += IMAGE_TOKENS * images
        previous = body.get("previous_response_id")
        if isinstance(previous, str):
            tokens += self.gw._conversations.get(previous, 0)
        self.input = tokens
        tier = body.get("service_tier")
        self.tier = tier if isinstance(tier, str) else None
        if self.rest in ("v1/chat/completions", "v1/completions") and body.get("stream"):
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                body["stream_options"] = {**(options or {}), "include_usage": True}
                self.withhold = changed = True
        if (
            self.rest == "v1/chat/completions"
            and "max_tokens" in body
            and ("max_completion_tokens" not in body)
        ):
            self.max_field = "max_tokens"  # the older name: clamp the one the client used
        self._cache_write = self.kind == "anthropic" and '"cache_control"' in text
        self._hour = self._cache_write and '"1h"' in text
        self._searches = 0
        for tool in body.get("tools") or []:
            if isinstance(tool, dict) and str(tool.get("type", "")).startswith("web_search"):
                uses = tool.get("max_uses")
                self._searches += uses if isinstance(uses, int) and uses > 0 else SEARCHES
        return changed

    def _worst(self, output: int) -> Tokens:
        """The dearest the call can be: every input token a cache write when it asks for some."""
        write = self.input if self._cache_write else 0
        hour = write if self._hour else 0
        return Tokens(
            input=self.input,
            output=output,
            cache_write=write,
            cache_write_1h=hour,
            web_searches=self._searches,
        )

    def _price(self, tokens: Tokens) -> int | None:
        priced = self.gw.prices.price(self.model, self.pricing, tokens, service_tier=self.tier)
        return None if priced is None else priced.micro_usd

    def _affordable(self) -> int | None:
        """The most output tokens every scope can still pay for, or None: no cap."""
        if not self.gw.limited():
            return None
        tokens_left: int | None = None
        micro_left: int | None = None
        for s in self.gw.backend_call("usage")["scopes"]:
            if s["scope"] == "rate":  # a rate is waited out (retry-after), not clamped to
                continue
            t, u = s["tokens"], s["usd"]
            if t["limit"] is not None:
                left = int(t["limit"]) - int(t["used"]) - int(t["held"])
                tokens_left = left if tokens_left is None else min(tokens_left, left)
            if u["limit"] is not None:
                usd = _decimal(u["limit"]) - _decimal(u["used"]) - _decimal(u["held"])
                micro = int((usd * 1_000_000).to_integral_value(rounding=ROUND_FLOOR))
                micro_left = micro if micro_left is None else min(micro_left, micro)
        best = None if tokens_left is None else tokens_left - self.input
        in_micro = self._price(self._worst(0))
        per_million = self._price(Tokens(output=1_000_000))
        if micro_left is not None and in_micro is not None and per_million:
            by_usd = (micro_left - in_micro) * 1_000_000 // per_million
            while by_usd > 0 and (self._price(self._worst(by_usd)) or 0) > micro_left:
                by_usd -= 1  # each part rounds up to a micro-USD: stay within the limit
            while (self._price(self._worst(by_usd + 1)) or 0) <= micro_left:
                by_usd += 1  # the division's floor may leave a token the limit can pay
            best = by_usd if best is None else min(best, by_usd)
        return best

    def _reserve(self, body: dict[str, Any]) -> None:
        asked = body.get(self.max_field) if self.max_field else None
        asked = asked if isinstance(asked, int) and not isinstance(asked, bool) else None
        if asked is None and self.rest == "v1/completions":
            asked = LEGACY_DEFAULT  # the API's own default: nothing to add, only to hold
        output = 0
        if self.max_field is not None:
            affordable = self._affordable()
            if asked is None:
                ceiling = _ceiling(self.model) if self.kind == "openai" else DEFAULT_OUTPUT
                if affordable is None:
                    output = ceiling  # no cap to keep under: the hold only
                else:
                    output = body[self.max_field] = max(1, min(ceiling, affordable))
                    self.clamped = True
            else:
                output = asked if affordable is None else max(1, min(asked, affordable))
                if output != asked:
                    body[self.max_field] = output
                    self.clamped = True
        self.output = output
        worst = self._worst(output)
        usd = None
        if worst.cache_write_1h or worst.web_searches or self.tier not in (None, "default", "auto"):
            micro = self._price(worst)
            usd = None if micro is None else Decimal(micro).scaleb(-6)
        try:
            answer = self.gw.backend_call(
                "reserve",
                model=self.model,
                provider=self.pricing,
                input_tokens=self.input,
                max_output_tokens=output,
                usd=usd,
                label=self.label,
                key=None,
            )
        except (BudgetError, StoreUnavailable) as e:
            raise self._denied(e) from None
        self.hold = answer["reservation"]

    def _denied(self, e: BudgetError | StoreUnavailable) -> _Denied:
        detail = {
            "via": "gateway",
            "provider": self.provider.name,
            "model": self.model,
            "label": self.label,
            "path": self.request.path,
        }
        if self.gw.on_denied is not None:
            try:
                self.gw.on_denied(e, detail)
            except Exception:
                pass  # the audit's trouble must not turn a denial into a 500
        message = f"supervise: {e.message}"
        if isinstance(e, RateLimited):
            after = max(1, math.ceil(e.retry_after))
            return _Denied(
                429,
                "rate_limit_exceeded",
                message,
                {"retry-after": str(after), "retry-after-ms": str(int(e.retry_after * 1000))},
            )
        no_retry = {"x-should-retry": "false"}
        if isinstance(e, BudgetExceeded | StoreUnavailable):
            if self.kind == "anthropic":  # Anthropic's own "credit balance is too low" shape
                return _Denied(400, "invalid_request_error", message, no_retry)
            return _Denied(429, "insufficient_quota", message, no_retry)
        return _Denied(400, "invalid_request_error", message, no_retry)  # unknown model

    def settle(self, usage: WireUsage | None, *, ok: bool) -> None:
        """Commit the reported usage; none: the hold if the call went through, else release."""
        hold, self.hold = self.hold, None
        if hold is None:
            return
        try:
            if usage is None and not ok:
                self.gw.backend_call("release", hold)
                return
            if usage is None:
                usage = WireUsage(input=self.input, output=self.output)
            tokens = Tokens(
                usage.input,
                usage.output,
                usage.cached_input,
                min(usage.cache_write, usage.input - usage.cached_input),
                usage.reasoning,
            )
            usd = None
            if usage.priced_apart:
                full = tokens._replace(
                    cache_write_1h=min(usage.cache_write_1h, tokens.cache_write),
                    web_searches=usage.web_searches,
                )
                priced = self.gw.prices.price(
                    self.model, self.pricing, full, service_tier=usage.service_tier
                )
                usd = None if priced is None else Decimal(priced.micro_usd).scaleb(-6)
            self.gw.backend_call(
                "commit",
                hold,
                input_tokens=tokens.input,
                output_tokens=tokens.output,
                cached_input_tokens=tokens.cached_input,
                cache_write_tokens=tokens.cache_write,
                reasoning_tokens=tokens.reasoning,
                usd=usd,
            )
            if self.rest == "v1/responses":
                self._remember(usage)
        except Exception:
            pass  # past a limit (written, a violation) or the store lost it: the run was told

    def _remember(self, usage: WireUsage) -> None:
        """A Responses answer is state upstream: a turn naming it re-reads all its tokens."""
        if self.response_id is None:
            return
        memory = self.gw._conversations
        if len(memory) >= MAX_CONVERSATIONS:
            del memory[next(iter(memory))]  # the oldest (dicts keep insertion order)
        memory[self.response_id] = usage.input + usage.output


def _ceiling(model: str) -> int:
    name = model.rsplit("/", 1)[-1].lower()
    best = ""
    for prefix in _CEILINGS:
        if name.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return _CEILINGS[best] if best else _DEFAULT_CEILING
