"""Gateway config: defaults derived from ports, and every error names file, key and reason."""

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_config

BASE = """
[server]
hostname = "mx.example.org"
"""


def write(tmp_path, text):
    p = tmp_path / "gateway.toml"
    p.write_text(BASE + text)
    return p


def test_defaults_follow_ports(tmp_path):
    cfg = load_config(write(tmp_path, """
[[listener]]
name = "mx"
kind = "smtp"
listen = ["0.0.0.0:25", "[::]:25"]
upstream = "10.8.0.2:2525"
[[listener]]
name = "submissions"
kind = "smtp"
listen = "0.0.0.0:465"
upstream = "10.8.0.2:4650"
[[listener]]
name = "imaps"
kind = "tcp"
listen = "[::]:993"
upstream = "10.8.0.2:993"
proxy_v2 = false
"""))
    mx, subs, imaps = cfg.listeners
    assert mx.greet_wait == 6.0 and mx.proxy_v2 and not mx.submission
    assert mx.listen == (("0.0.0.0", 25), ("::", 25))
    assert subs.submission and subs.implicit_tls and subs.greet_wait == 0 and not subs.speaks_smtp_replies
    assert imaps.kind == "tcp" and not imaps.proxy_v2 and imaps.idle_timeout == 1800


@pytest.mark.parametrize(
    "text,key,reason",
    [
        ('[[listener]]\nname="a"\nkind="smtp"\nlisten="0.0.0.0:25"\nupstream="10.0.0.1:25"\ngreet_wiat="3s"\n',
         "listener[0].greet_wiat", "unknown key"),
        ('[[listener]]\nname="a"\nkind="smtp"\nlisten="0.0.0.0:587"\nupstream="10.0.0.1:25"\ndnsbl=true\n[dnsbl]\nzones=["zen.example"]\n',
         "listener[0].dnsbl", "never applied to submission"),
        ('[[listener]]\nname="a"\nkind="smtp"\nlisten="0.0.0.0:465"\nupstream="10.0.0.1:25"\ngreet_wait="5s"\n',
         "listener[0].greet_wait", "only for MX"),
        ('[[listener]]\nname="a"\nkind="tcp"\nlisten="0.0.0.0:993"\nupstream="10.0.0.1:993"\ngreet_wait="5s"\n',
         "listener[0].greet_wait", "kind = \"smtp\""),
        ('[[listener]]\nname="a"\nkind="ftp"\nlisten="0.0.0.0:21"\nupstream="10.0.0.1:21"\n',
         "listener[0].kind", "expected one of"),
        ('[[listener]]\nname="a"\nkind="tcp"\nlisten="mail.example.org:993"\nupstream="10.0.0.1:993"\n',
         "listener[0].listen", "not an IP address"),
        ('[[listener]]\nname="a"\nkind="tcp"\nlisten="0.0.0.0:993"\n', "listener[0].upstream", "missing"),
        ('[limits]\nmax_connections=0\n[[listener]]\nname="a"\nkind="tcp"\nlisten="0.0.0.0:993"\nupstream="10.0.0.1:993"\n',
         "limits.max_connections", "positive integer"),
        ('[[listener]]\nname="a"\nkind="tcp"\nlisten="0.0.0.0:993"\nupstream="10.0.0.1:993"\n'
         '[[listener]]\nname="b"\nkind="tcp"\nlisten="0.0.0.0:993"\nupstream="10.0.0.1:994"\n',
         "listener[1].listen", "already used"),
        ('[bogus]\n[[listener]]\nname="a"\nkind="tcp"\nlisten="0.0.0.0:993"\nupstream="10.0.0.1:993"\n',
         "bogus", "unknown key"),
        ("", "listener", "at least one"),
    ],
)
def test_errors_name_file_key_reason(tmp_path, text, key, reason):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.file == str(p)
    assert ei.value.key == key
    assert reason in ei.value.reason


def test_config_check_command(tmp_path, capsys):
    good = write(tmp_path, '[[listener]]\nname="mx"\nkind="smtp"\nlisten="0.0.0.0:25"\nupstream="10.8.0.2:2525"\n')
    assert main(["config", "check", "-c", str(good)]) == 0
    assert "listener mx: smtp 0.0.0.0:25 -> 10.8.0.2:2525 proxy_v2 greet_wait=6s" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nhostname='mx.example.org'\nport=25\n")
    assert main(["config", "check", "-c", str(bad)]) == 2
    assert f"{bad}: server.port: unknown key" in capsys.readouterr().err


def test_smtp_idle_default_outlasts_the_backend_listener_timeout(tmp_path):
    """The client must read the backend's own `421 4.4.2` idle reply before the gateway cuts the
    splice: the gateway's default SMTP idle timeout exceeds every backend listener's default
    timeout, with room for the 421 to cross the tunnel. Both daemons' real loaders, defaults only."""
    from backend.config import LISTENER_KINDS, load_config as load_backend_config
    from tests.backend.helpers import listener_block, write_config

    backend = load_backend_config(write_config(
        tmp_path / "backend", "".join(listener_block(k, k, "127.0.0.1:0") for k in LISTENER_KINDS)))
    gateway = load_config(write(tmp_path, "".join(
        f'[[listener]]\nname = "l{port}"\nkind = "smtp"\nlisten = "0.0.0.0:{port}"\nupstream = "10.8.0.2:2{port}"\n'
        for port in (25, 465, 587))))
    for g in gateway.listeners:
        for b in backend.listeners:
            assert g.idle_timeout >= b.timeout + 10, (g.name, g.idle_timeout, b.name, b.timeout)
