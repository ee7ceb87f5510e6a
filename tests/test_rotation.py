"""Key rotation with a grace period, and a revoked key that stays revoked."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest

from node.accounts.keys import KeyRecord, KeyRing, hash_secret
from node.errors import AuthenticationError
from tests.conftest import run_cli, wait_until
from tests.test_roles import healthy


def test_ring_accepts_the_old_secret_only_within_its_grace() -> None:
    old, new = "sk-" + secrets.token_hex(8), "sk-" + secrets.token_hex(8)
    rec = KeyRecord(id="k", name="n", secret_hash=hash_secret(old), prefix=old[:8])
    ring = KeyRing([rec])
    ring.put(rec.updated(secret_hash=hash_secret(new), old_secret_hash=hash_secret(old), old_valid_until=100.0))
    assert ring.lookup(new, now=99.0) is not None and ring.lookup(old, now=99.0) is not None
    with pytest.raises(AuthenticationError) as e:
        ring.lookup(old, now=100.0)
    assert e.value.code == "key_rotated"
    # A second rotation forgets the first secret entirely.
    newer = "sk-" + secrets.token_hex(8)
    ring.put(ring.get("k").updated(secret_hash=hash_secret(newer), old_secret_hash=hash_secret(new),
                                   old_valid_until=200.0))
    assert ring.lookup(old, now=150.0) is None and ring.lookup(new, now=150.0) is not None
    assert len(ring) == 1


def test_rotate_and_no_unrevoke(node_factory) -> None:
    n = node_factory("", ready=False)
    assert wait_until(lambda: healthy(n), timeout=60)

    def status(secret: str) -> httpx.Response:
        return httpx.get(n.url + "/v1/models", headers={"authorization": f"Bearer {secret}"}, timeout=10)
    with n.admin() as c:
        made = c.post("/admin/v1/keys", json={"name": "a", "rpm": 100}).json()
        kid, old = made["id"], made["key"]
        rotated = c.post(f"/admin/v1/keys/{kid}/rotate", json={"grace_s": 2})
        assert rotated.status_code == 200
        new = rotated.json()["key"]
        assert new != old and rotated.json()["prefix"] == new[:8] and rotated.json()["rpm"] == 100
        assert "old_secret_hash" not in rotated.text and hash_secret(old) not in rotated.text
        t = time.monotonic()
        assert status(old).status_code == 200 and status(new).status_code == 200
        time.sleep(max(0.0, 2.1 - (time.monotonic() - t)))
        r = status(old)
        assert r.status_code == 401 and r.json()["error"]["code"] == "key_rotated"
        assert status(new).status_code == 200
        # Default grace 0: the old secret is refused at once.
        newer = c.post(f"/admin/v1/keys/{kid}/rotate").json()["key"]
        assert status(new).status_code == 401 and status(newer).status_code == 200
        for bad in ({"grace_s": -1}, {"grace_s": "soon"}, {"grace_s": 10**12}, {"grace": 5}, [1]):
            r = c.post(f"/admin/v1/keys/{kid}/rotate", json=bad)
            assert r.status_code == 422 and r.json()["error"]["param"] is not None, bad
        assert c.post("/admin/v1/keys/key_nope/rotate").status_code == 404

        assert c.post(f"/admin/v1/keys/{kid}/revoke").status_code == 200
        r = c.patch(f"/admin/v1/keys/{kid}", json={"revoked": False})
        assert r.status_code == 409 and "cannot be restored" in r.json()["error"]["message"]
        assert c.get(f"/admin/v1/keys/{kid}").json()["revoked"] is True
        assert c.post(f"/admin/v1/keys/{kid}/rotate").status_code == 409
        assert status(newer).json()["error"]["code"] == "key_revoked"
        # Other changes to a revoked key (its name, metadata) are still allowed.
        assert c.patch(f"/admin/v1/keys/{kid}", json={"name": "retired"}).json()["revoked"] is True
    p = run_cli("keys", "rotate", kid, config=n.config)
    assert p.returncode == 1 and "409" in p.stderr
    live = n.create_key(name="live")
    kid2 = next(k["id"] for k in n.admin().get("/admin/v1/keys").json()["data"] if k["name"] == "live")
    out = run_cli("keys", "rotate", kid2, "--grace", "60", config=n.config, check=True).stdout
    assert status(out.strip().splitlines()[-1]).status_code == 200 and status(live).status_code == 200
