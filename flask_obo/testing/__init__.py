"""Test helpers shipped with flask-obo, for applications and for authors of stores.

``TokenCacheStoreContract`` is the contract every token-cache store must pass: the
stores flask-obo ships run it (``tests/contract/``), and so can your own::

    from flask_obo.testing import TokenCacheStoreContract

    class TestMyStore(TokenCacheStoreContract):
        def make_store(self):
            return MyStore(...)  # on an empty namespace of its own

Nothing here is imported by ``flask_obo`` itself.
"""

from .store_contract import RecordingWatcher, TokenCacheStoreContract

__all__ = ["RecordingWatcher", "TokenCacheStoreContract"]
