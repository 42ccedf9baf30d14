"""fal's Platform APIs (pricing, billing events, usage) on their own TLS server.

The simulator's queue engine tells the `BillingBook` when a request completes; the book
bills it the way fal does: only successful outputs, `output_units` = seconds of video
actually produced (whatever the output JSON says), `unit_price` from the simulator's own
price list at submit time, an optional `percent_discount` per endpoint, and
`cost_estimate_nano_usd`. Knobs make fal's bill differ on purpose (a delay before events
appear, a share of requests billed with different units) so reconciliation can be proven.

Shapes follow shared/fal-wire.md "Platform APIs": `Authorization: Key <admin key>`,
1-50 endpoint (or request) ids, cursor pagination (`next_cursor`, `has_more`), `limit`
up to 10,000, `end` exclusive, a range of at most 90 days.

The request list (`GET /v1/models/requests/by-endpoint`) shows every request the queue
engine accepted, with the `X-Fal-Tags` it carried: fed by the engine's submit listener
(`attach`), read from this server's thread under the book's lock.

Split by concern: `prices` (the price list), `events` (one billing event), `synthetic`
(events from a formula), `book` (the billing book and the request list), `api` (the HTTP
surface) and `server` (serving it in a thread).
"""

from renderqueue_pipeline.simulator.platform.api import build_platform_app
from renderqueue_pipeline.simulator.platform.book import (
    BillingBook,
    BillingConfig,
    attach,
    request_entry,
    request_status,
)
from renderqueue_pipeline.simulator.platform.events import BillingEvent, iso
from renderqueue_pipeline.simulator.platform.prices import PriceBook, SimPrice, seed_prices
from renderqueue_pipeline.simulator.platform.server import PlatformServer, platform_env
from renderqueue_pipeline.simulator.platform.synthetic import SyntheticBilling

__all__ = [
    "BillingBook",
    "BillingConfig",
    "BillingEvent",
    "PlatformServer",
    "PriceBook",
    "SimPrice",
    "SyntheticBilling",
    "attach",
    "build_platform_app",
    "iso",
    "platform_env",
    "request_entry",
    "request_status",
    "seed_prices",
]
