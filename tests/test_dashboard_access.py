"""The dashboard's access rules on the HTTP front-end app (no controller needed): the one-time
login code, the cookie it sets, the clean redirect, and what needs the cookie or the token."""

from __future__ import annotations

from pathlib import Path

from starlette.testclient import TestClient

from flow_nexus_server.config import Settings
from flow_nexus_server.controller.channel import ControllerPaths
from flow_nexus_server.dashboard_access import DashboardAccess
from flow_nexus_server.http_app import create_app

TOKEN = "-secret-bearer-token-for-the-test"


def app_and_access(tmp_path: Path, code_ttl_s: float = 120.0) -> tuple[TestClient, DashboardAccess]:
    access = DashboardAccess(code_ttl_s=code_ttl_s)
    app = create_app(ControllerPaths(tmp_path), settings=Settings(home=tmp_path), token=TOKEN,
                     allowed_hosts=["testserver"], access=access)
    # Without `with`: no lifespan, so no controller is looked for; these routes do not need one.
    return TestClient(app, base_url="http://testserver", follow_redirects=False), access


def test_a_login_code_works_once_and_leads_to_a_clean_url(tmp_path):
    client, access = app_and_access(tmp_path)
    assert client.get("/dashboard").status_code == 401
    assert client.get("/dashboard/feed").status_code == 401
    assert client.get("/dashboard/static/app.js").status_code == 401
    assert client.get("/dashboard/login", params={"code": "made-up"}).status_code == 401

    code = access.new_code()
    login = client.get("/dashboard/login", params={"code": code})
    assert login.status_code == 303 and login.headers["location"] == "/dashboard"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    assert code not in cookie and TOKEN not in cookie
    assert login.headers["referrer-policy"] == "no-referrer"

    page = client.get("/dashboard")
    assert page.status_code == 200 and "<title>flow-nexus-server dashboard</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert TOKEN not in page.text and code not in page.text
    assert client.get("/dashboard/static/app.js").text.startswith("// The dashboard")
    assert client.get("/dashboard/static/../index.html").status_code == 404

    # The code is used up: a second browser (no cookie) gets nothing for it.
    other = TestClient(client.app, base_url="http://testserver", follow_redirects=False)
    again = other.get("/dashboard/login", params={"code": code})
    assert again.status_code == 401 and "--new-link" in again.text
    assert "set-cookie" not in again.headers
    # The cookie is no bearer token: /mcp still wants the token.
    assert client.post("/mcp", json={}).status_code == 401


def test_codes_expire_and_new_ones_need_the_token(tmp_path):
    client, access = app_and_access(tmp_path, code_ttl_s=0.0)
    assert client.get("/dashboard/login", params={"code": access.new_code()}).status_code == 401  # expired

    assert client.post("/dashboard/login-codes").status_code == 401
    assert client.post("/dashboard/login-codes", headers={"Authorization": "Bearer wrong"}).status_code == 401
    minted = client.post("/dashboard/login-codes", headers={"Authorization": f"Bearer {TOKEN}"})
    assert minted.status_code == 200 and minted.json()["login_path"].startswith("/dashboard/login?code=")
    # A foreign Host is refused before anything else (DNS rebinding).
    assert client.get("/dashboard", headers={"Host": "evil.example"}).status_code == 421


def test_the_dashboard_command_refuses_a_wide_bind_without_a_token(tmp_path):
    """The MCP endpoint's rule: beyond loopback only with a token (exit 2, nothing served)."""
    import subprocess

    from conftest import server_command, server_env

    home = tmp_path / "home"
    done = subprocess.run([server_command(), "dashboard", "--host", "0.0.0.0", "--port", "8799"],
                          env=server_env(home), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "refusing to bind 0.0.0.0" in done.stderr and "FLOW_NEXUS_TOKEN" in done.stderr
    assert not (home / "controller.sock").exists()
