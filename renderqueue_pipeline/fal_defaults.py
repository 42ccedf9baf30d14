"""fal's public addresses and our defaults for them, defined once.

Settings, the fal gateway, the Platform API client and the Dagster resources all take
their defaults from here, so a changed address is one edit (issue 20).
"""

from __future__ import annotations

#: fal's Platform APIs (prices, billing, request lists); RENDERQUEUE_FAL_API_URL overrides it
FAL_API_URL = "https://api.fal.ai/v1"
#: fal's REST API (deleting a request's payloads); RENDERQUEUE_FAL_REST_URL overrides it
FAL_REST_URL = "https://rest.alpha.fal.ai"
#: the keys fal signs webhooks with; FAL_JWKS_URL overrides it
FAL_JWKS_URL = f"{FAL_REST_URL}/.well-known/jwks.json"
#: seconds fal keeps our outputs unless told otherwise (RENDERQUEUE_FAL_OBJECT_LIFETIME)
FAL_OBJECT_LIFETIME = 7 * 86400.0
