from urllib.parse import parse_qs, urlencode, urlsplit

import psycopg
from hypothesis import given
from hypothesis import strategies as st

from ledger.connections import Bounds, bounded_url

BOUNDS = Bounds()


def query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def test_every_bound_is_added_to_a_plain_url() -> None:
    url = bounded_url("postgresql://u@db:5432/tasks", BOUNDS.statements())
    params = psycopg.conninfo.conninfo_to_dict(url)
    assert params["connect_timeout"] == "3"
    assert params["keepalives"] == "1"
    assert params["tcp_user_timeout"] == "10000"
    options = str(params["options"])
    for setting in ("statement_timeout=10s", "lock_timeout=5s", "tcp_keepalives_idle=5"):
        assert f"-c {setting}" in options


def test_what_the_operator_set_wins() -> None:
    url = bounded_url(
        "postgresql://u@db/tasks?connect_timeout=30&options=-c%20statement_timeout%3D1min",
        BOUNDS.statements(),
    )
    params = psycopg.conninfo.conninfo_to_dict(url)
    assert params["connect_timeout"] == "30"
    # Both statement_timeouts are sent; the server applies the last one, the operator's.
    assert str(params["options"]).endswith("-c statement_timeout=1min")


def test_a_unix_socket_url_keeps_its_host() -> None:
    url = bounded_url("postgresql://postgres@/postgres?host=/tmp/pg%20sock", BOUNDS.network())
    assert query(url)["host"] == ["/tmp/pg sock"]
    assert psycopg.conninfo.conninfo_to_dict(url)["host"] == "/tmp/pg sock"


@given(st.dictionaries(st.sampled_from(["sslmode", "application_name", "port"]), st.text()))
def test_other_parameters_pass_through(given_params: dict[str, str]) -> None:
    url = bounded_url(f"postgresql://u@db/tasks?{urlencode(given_params)}", BOUNDS.network())
    for name, value in given_params.items():
        assert query(url).get(name, [""]) == [value]
