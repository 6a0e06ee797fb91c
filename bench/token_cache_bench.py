"""Token-cache benchmark: one command, all figures from one run against a real redis-server.

    python bench/token_cache_bench.py            (or: make bench)

Measures, interleaved round by round so machine noise hits every series alike (the
figure per series is its fastest round):
  * bare GET      redis GET of a value the size of one user's sealed cache
  * warm, memory  OnBehalfOfTokenProvider.acquire_token on a cache hit, steady state: the
                  user's session in the memory tier is current, msal silent hit, no Redis
  * warm, re-read the same when the session must be checked against Redis (after an
                  invalidation or a reconnection): Redis GET, blob recognised as
                  unchanged, msal silent hit
  * warm, new blob  the same when the blob changed since this worker last saw it:
                  Redis GET + decrypt + decompress + msal cache load + silent hit
  * warm, new worker  the same with no per-user state in the process: GET + decrypt +
                  decompress + msal app built + silent hit
  * msal memory   msal with a long-lived app and in-memory cache (no Redis, no crypto)
and the bytes in Redis per user against msal's own JSON after 1 and 5 SPA tokens.
Targets: warm, re-read <= 3x bare GET; bytes <= 0.6x msal's JSON; no growth.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msal
import redis
import responses
from cryptography.fernet import Fernet

from app import create_app
from flask_obo.extension import services_of
from flask_obo.protector import EntraAccessToken
from flask_obo.settings import Settings
from flask_obo.token_cache import TokenCacheCodec
from tests.support.fake_entra import (
    ADELE,
    AUTHORITY_HOST,
    CLIENT_ID,
    CLIENT_SECRET,
    TENANT_ID,
    FakeEntra,
    settings_env,
)
from tests.support.servers import redis_server

CALLS, ROUNDS = 2000, 7


def per_call_us(fn, calls: int = CALLS) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def user_of(api_token: str) -> EntraAccessToken:
    payload = api_token.split(".")[1]
    return EntraAccessToken(json.loads(base64.urlsafe_b64decode(payload + "==")), api_token)


def main() -> int:
    with redis_server() as url, responses.RequestsMock(assert_all_requests_are_fired=False) as rsps, \
            tempfile.TemporaryDirectory(prefix="flask-obo-bench-authority-") as authority_dir:
        entra = FakeEntra(realistic=True)
        entra.register(rsps)
        key = Fernet.generate_key().decode()
        # A fresh disk copy of the authority's documents: FakeEntra makes new keys each run
        # under the same kid, so one left by an earlier run would fail every signature.
        settings = Settings.from_env(settings_env(REDIS_URL=url, TOKEN_CACHE_KEYS=key,
                                                  AUTHORITY_CACHE_DIR=authority_dir))
        app = create_app(settings)
        client = app.test_client()
        provider = services_of(app).tokens
        r = redis.Redis.from_url(url)

        # --- bytes per user after 1 and 5 SPA tokens -------------------------------------
        sizes = []
        for n in range(1, 6):
            token = entra.api_token(ADELE)
            assert client.get("/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            (cache_key,) = [k for k in r.keys("flask-obo:*") if b":lock:" not in k]
            blob = r.get(cache_key)
            partition = re.search(r"[0-9a-f]{64}", cache_key.decode()).group(0)  # sha256 of oid.tid
            cache = msal.SerializableTokenCache()  # msal's own JSON, as msal writes it
            cache.deserialize(TokenCacheCodec([key]).open(partition, blob))
            if n in (1, 5):
                sizes.append((n, len(blob), len(cache.serialize())))
        obo_calls = entra.obo_calls()

        # --- warm-path latency ------------------------------------------------------------
        user = user_of(token)
        scopes = list(settings.graph_scopes)
        r.set("bench:bare", blob)
        memory_app = msal.ConfidentialClientApplication(
            CLIENT_ID, client_credential=CLIENT_SECRET, authority=f"{AUTHORITY_HOST}/{TENANT_ID}",
            token_cache=cache, instance_discovery=False)
        account = memory_app.get_accounts()[0]

        sessions = provider.memory._sessions

        def warm_reread() -> None:
            for session in sessions.values():
                session.verified_epoch = -1  # as after an invalidation: check Redis first
            provider.acquire_token(user, scopes)

        def warm_blob_changed() -> None:
            for session in sessions.values():
                session.blob = None  # as if another worker had written: decrypt + load
                session.verified_epoch = -1
            provider.acquire_token(user, scopes)

        def warm_new_worker() -> None:
            sessions.clear()  # a fresh worker: build the app, decrypt, deserialize
            provider.acquire_token(user, scopes)

        series = {
            "bare GET": lambda: r.get("bench:bare"),
            "warm, memory": lambda: provider.acquire_token(user, scopes),
            "warm, re-read": warm_reread,
            "warm, new blob": warm_blob_changed,
            "warm, new worker": warm_new_worker,
            "msal memory": lambda: memory_app.acquire_token_silent(scopes, account),
        }
        for fn in series.values():  # warm up connections, imports, caches
            per_call_us(fn, 200)
        best = {name: float("inf") for name in series}
        for _ in range(ROUNDS):
            for name, fn in series.items():
                best[name] = min(best[name], per_call_us(fn))
        assert entra.obo_calls() == obo_calls, "the warm path must not call Entra ID"

    bare = best["bare GET"]
    print(f"redis-server, {CALLS} calls x {ROUNDS} rounds, fastest round per series")
    print(f"{'series':<16}{'us/call':>10}{'x bare GET':>12}")
    for name, us in best.items():
        print(f"{name:<16}{us:>10.1f}{us / bare:>12.2f}")
    print(f"\n{'SPA tokens':<12}{'Redis bytes':>12}{'msal JSON':>11}{'ratio':>8}")
    for n, stored, msal_json in sizes:
        print(f"{n:<12}{stored:>12}{msal_json:>11}{stored / msal_json:>8.2f}")
    print(f"OBO calls for 5 SPA tokens: {obo_calls}")

    growth = sizes[1][1] - sizes[0][1]
    checks = {
        "warm, re-read <= 3x bare GET": best["warm, re-read"] <= 3 * bare,
        "bytes <= 0.6x msal JSON": all(stored <= 0.6 * j for _, stored, j in sizes),
        "no growth from new SPA tokens": growth <= 0 and obo_calls == 1,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
