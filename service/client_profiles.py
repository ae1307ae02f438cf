"""Which client profile (``cards.profiles``) answers a call: the calling issuer's, or the configured one.

With authentication on, each trusted issuer names its profile in ``CMV_CDS_TRUSTED_ISSUERS`` (``"profile"``,
default ``cds-hooks-2.0``; ``"preferenceListItems"`` for ``epic``). With authentication off there is no
verified issuer, and ``CMV_CDS_CLIENT_PROFILE`` decides. ``CMV_CDS_PREFERENCE_LIST_ITEMS`` is the
preference-list map of an ``epic`` profile that has none of its own.
"""

from __future__ import annotations

from cards.profiles import ClientProfile
from service.auth import load_trusted_issuers
from service.config import Settings, parse_preference_list_items


class ClientProfiles:
    """The profile of every trusted issuer, and the one for calls without a verified issuer."""

    def __init__(self, settings: Settings) -> None:
        default_items = parse_preference_list_items(settings.preference_list_items, "CMV_CDS_PREFERENCE_LIST_ITEMS")
        self._unauthenticated = ClientProfile(settings.client_profile, default_items)
        self._by_issuer = {
            iss: ClientProfile(
                issuer.profile,
                default_items if issuer.preference_list_items is None else dict(issuer.preference_list_items),
            )
            for iss, issuer in load_trusted_issuers(settings.trusted_issuers).items()
        }

    def for_issuer(self, iss: str | None) -> ClientProfile:
        """The profile for a call by the verified issuer ``iss`` (None: authentication off)."""
        if iss is None:
            return self._unauthenticated
        return self._by_issuer.get(iss, ClientProfile())
