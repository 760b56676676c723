"""The local Ray's auth token file is its owner's only (no Ray started here; tests/test_serve.py checks a
live local Ray: listening on 127.0.0.1 only, token file created 0600)."""

import stat

from rebalance.runtime.session import secure_ray_token_file


def test_the_ray_token_file_is_created_or_narrowed_to_0600(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # Ray's default for a new local instance: token
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    path = tmp_path / "ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert secure_ray_token_file() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    path.chmod(0o644)  # as Ray writes it with the default umask
    assert secure_ray_token_file() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == token  # kept, narrowed
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    path.chmod(0o644)
    assert secure_ray_token_file() is None and stat.S_IMODE(path.stat().st_mode) == 0o644  # not Ray's file
