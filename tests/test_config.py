from pathlib import Path

import pytest

from revault.config import ConfigError, ConfigTable, load_config_file, parse_host_port

KEY = "ab" * 32


def table(data):
    return ConfigTable(data)


def test_typed_reads_and_defaults():
    t = table({"s": "x", "i": 3, "f": 1.5, "b": True, "l": ["a"], "t": {"k": 1}})
    assert t.string("s") == "x"
    assert t.integer("i", minimum=1, maximum=3) == 3
    assert t.number("f") == 1.5
    assert t.number("i") == 3.0
    assert t.boolean("b") is True
    assert t.string_list("l") == ["a"]
    assert t.table("t").integer("k") == 1
    assert t.integer("absent", default=7) == 7
    t.finish()


@pytest.mark.parametrize("data, read, message", [
    ({}, lambda t: t.string("listen"), "listen: missing"),
    ({"port": True}, lambda t: t.integer("port"), "port: expected an integer, got a boolean"),
    ({"port": "1"}, lambda t: t.integer("port"), "port: expected an integer, got a string"),
    ({"n": 0}, lambda t: t.integer("n", minimum=1), "n: must be at least 1, got 0"),
    ({"n": 9}, lambda t: t.number("n", maximum=5), "n: must be at most 5, got 9"),
    ({"l": ["a", 1]}, lambda t: t.string_list("l"), "l[1]: expected a string, got an integer"),
    ({"p": {"k": "zz"}}, lambda t: t.table("p").noise_key("k"), "p.k: expected 64 hex"),
    ({"p": {"ks": [KEY, KEY]}}, lambda t: t.table("p").noise_keys("ks"), "p.ks[1]: duplicate key"),
    ({"p": {"ks": [KEY, 5]}}, lambda t: t.table("p").noise_keys("ks"), "p.ks[1]: expected a string"),
    ({"listen": "nohost"}, lambda t: t.listen("listen"), 'listen: expected "HOST:PORT"'),
    ({"listen": "h:70000"}, lambda t: t.listen("listen"), "listen: port must be 0..65535"),
    ({"d": ""}, lambda t: t.path("d", Path("/")), "d: must not be empty"),
])
def test_each_bad_value_names_its_key(data, read, message):
    with pytest.raises(ConfigError) as e:
        read(table(data))
    assert str(e.value).startswith(message)


def test_unknown_keys_are_all_reported_with_their_full_name():
    t = table({"listen": "127.0.0.1:1", "lisen": 1, "peers": {"managers": [], "manager": []}})
    t.listen("listen")
    t.table("peers").noise_keys("managers")
    with pytest.raises(ConfigError) as e:
        t.finish()
    assert e.value.problems == ["lisen: unknown key", "peers.manager: unknown key"]


def test_paths_are_relative_to_the_config_directory(tmp_path):
    assert table({"d": "data"}).path("d", tmp_path) == tmp_path / "data"
    assert table({"d": "/abs"}).path("d", tmp_path) == Path("/abs")


def test_host_port_forms():
    assert parse_host_port("127.0.0.1:8383", "x") == ("127.0.0.1", 8383)
    assert parse_host_port("[::1]:0", "x") == ("::1", 0)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(bad)
    good = tmp_path / "good.toml"
    good.write_text('listen = "127.0.0.1:1"\n')
    assert load_config_file(good).listen("listen") == ("127.0.0.1", 1)
