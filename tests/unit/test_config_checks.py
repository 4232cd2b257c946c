"""Config problems found before anything runs, each named with its path: duplicate YAML keys, unset ``${VAR}``s,
``*_env`` keys that hold a reference instead of a variable's name (never expanded, so a key cannot leak into a
message), credentials given twice, a nested router's missing file, Redis state without its URL, unset security key
variables, endpoints the client cannot append /chat/completions to, a fixed panel larger than the experts, and a
file that is not UTF-8."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import ConfigError, load_config, parse_config


def expert(**fields: object) -> dict[str, object]:
    return {"name": "alpha", "type": "vllm", "endpoint": "http://127.0.0.1:9/v1", "model": "m", **fields}


def problems(raw: dict[str, object], *, base_dir: Path | str = ".", check_env: bool = True) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base_dir=base_dir, check_env=check_env)
    return dict(info.value.problems)


def load_refused(path: Path, text: str) -> ConfigError:
    """The error ``load_config`` raises for ``text`` written to ``path`` (it must raise one)."""
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, check_env=False)
    return info.value


@pytest.mark.parametrize(("text", "says", "line"), [
    ("version: 1\nservice:\n  port: 8000\n  port: 9000\nexperts: []\n", "found the key 'port' twice", 4),
    # beside a merge key (which is allowed to be overridden), a key written twice is still refused
    ("MERGED", "found the key 'name' twice (first on line 8)", 9),
])
def test_a_key_given_twice_is_refused_naming_the_file_and_lines(tmp_path: Path, text: str, says: str,
                                                                 line: int) -> None:
    path = tmp_path / "dup.yaml"
    (where, message), = load_refused(path, MERGED + "    name: delta\n" if text == "MERGED" else text).problems
    assert where == "<yaml>" and says in message
    assert f'in "{path}", line {line}' in message


def test_yaml_syntax_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    error = load_refused(path, "version: 1\nexperts:\n  - name: a\n   type: x\n")
    assert f'in "{path}", line 4' in error.problems[0][1] and "<unicode string>" not in str(error)


def test_an_unset_variable_without_a_default_is_a_problem_with_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOE_TEST_UNSET_DIR", raising=False)
    raw = {"version": 1, "experts": [expert(endpoint="http://${MOE_TEST_UNSET_DIR}/v1")]}
    found = problems(raw)
    assert "MOE_TEST_UNSET_DIR is not set" in found["experts[0] (alpha).endpoint"]
    assert "${MOE_TEST_UNSET_DIR:-default}" in found["experts[0] (alpha).endpoint"]
    # a default, or a set variable, is fine; require_vars=False (moe compose, whose containers get the variables)
    # leaves it ""
    raw_default = {"version": 1, "experts": [expert(endpoint="http://${MOE_TEST_UNSET_DIR:-127.0.0.1:9}/v1")]}
    assert parse_config(raw_default).experts[0].endpoint == "http://127.0.0.1:9/v1"
    assert parse_config(raw, require_vars=False).experts[0].endpoint == "http:///v1"


def test_an_unset_variable_is_a_problem_even_where_keys_need_not_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_env=False (moe train, moe config check --no-env) relaxes only the *_env keys: a path built from an
    unset variable would otherwise become a path from the filesystem's root."""
    monkeypatch.delenv("MOE_TEST_UNSET_DIR", raising=False)
    raw = {"version": 1, "experts": [expert(), expert(name="beta")],
           "gate": {"artifact": "${MOE_TEST_UNSET_DIR}/gate"}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, check_env=False)
    assert "MOE_TEST_UNSET_DIR is not set" in dict(info.value.problems)["gate.artifact"]


def test_descriptions_and_examples_are_never_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Free text keeps a ``${...}`` as written: an example about shell variables is routable without setting
    them, and a variable's value (a secret perhaps) is never trained on or shown by /v1/experts."""
    monkeypatch.setenv("MOE_TEST_DB_PASSWORD", "s3cr3t-DBPASS")
    monkeypatch.delenv("MOE_TEST_UNSET_DIR", raising=False)
    raw = {"version": 1, "experts": [
        expert(description="answers about ${MOE_TEST_DB_PASSWORD} and ${MOE_TEST_UNSET_DIR}",
               examples=["how to export ${MOE_TEST_DB_PASSWORD} safely", "what does ${HOME} hold"]),
        expert(name="beta")]}
    config = parse_config(raw)
    alpha = config.expert("alpha")
    assert alpha.description == "answers about ${MOE_TEST_DB_PASSWORD} and ${MOE_TEST_UNSET_DIR}"
    assert alpha.examples == ["how to export ${MOE_TEST_DB_PASSWORD} safely", "what does ${HOME} hold"]
    assert "s3cr3t" not in config.model_dump_json()


def test_a_doubled_dollar_is_a_literal_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_TEST_HOST", "127.0.0.1")
    raw = {"version": 1, "experts": [expert(endpoint="http://${MOE_TEST_HOST}:9/v1", model="m-$${MOE_TEST_HOST}")]}
    config = parse_config(raw)
    assert (config.experts[0].endpoint, config.experts[0].model) == ("http://127.0.0.1:9/v1", "m-${MOE_TEST_HOST}")


def test_an_env_key_holding_a_reference_is_refused_and_the_secret_never_printed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_TEST_TOKEN", "hf_SECRETVALUE123")  # looks like a variable's name once expanded
    raw = {"version": 1, "experts": [expert(api_key_env="${MOE_TEST_TOKEN}")]}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert "hf_SECRETVALUE123" not in str(info.value)
    assert "write the variable's name itself" in dict(info.value.problems)["experts[0] (alpha).api_key_env"]


@pytest.mark.parametrize(("section", "key"), [("security", "api_keys_env"), ("security", "admin_key_env"),
                                              ("state", "url_env")])
def test_every_env_key_holding_a_reference_is_named_once_with_the_reason(
        monkeypatch: pytest.MonkeyPatch, section: str, key: str) -> None:
    monkeypatch.setenv("MOE_TEST_TOKEN", "redis://:SECRETVALUE@host:6379/0")
    raw = {"version": 1, "experts": [expert()], section: {key: "${MOE_TEST_TOKEN}"}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert "SECRETVALUE" not in str(info.value)
    # One problem for the field: why it is wrong, not also pydantic's "should match pattern".
    assert info.value.problems == [(f"{section}.{key}", f"names an environment variable: write the variable's name "
                                                        f"itself ({key}: {dict(ENV_EXAMPLES)[key]}), not a ${{...}} "
                                                        "reference to it")]


ENV_EXAMPLES = [("api_keys_env", "MOE_API_KEYS"), ("admin_key_env", "MOE_ADMIN_KEY"), ("url_env", "MOE_REDIS_URL")]


@pytest.mark.parametrize("padding", [" ", "\n", "\r\n\t"])
def test_an_expert_key_is_read_stripped_and_a_blank_one_is_a_problem(monkeypatch: pytest.MonkeyPatch,
                                                                    padding: str) -> None:
    """A key mounted from a file ends in a newline, which no HTTP header may carry: the key is the variable's value
    stripped, as a client key is, and one of blanks only is as good as none."""
    monkeypatch.setenv("MOE_TEST_KEY", f"{padding}sk-key{padding}")
    raw = {"version": 1, "experts": [expert(api_key_env="MOE_TEST_KEY")]}
    assert parse_config(raw).experts[0].api_key() == "sk-key"
    monkeypatch.setenv("MOE_TEST_KEY", padding)
    assert problems(raw)["experts[0] (alpha).api_key_env"] == "environment variable MOE_TEST_KEY is empty"
    assert parse_config(raw, check_env=False).experts[0].api_key() is None


@pytest.mark.parametrize("inside", ["\n", "\r", "\x01", "\x1b", "\x7f", "\u043a\u043b\u044e\u0447", "\u00e9"])
def test_a_key_with_a_control_character_inside_is_a_problem_that_never_shows_the_key(
        monkeypatch: pytest.MonkeyPatch, inside: str) -> None:
    """A key pasted across two lines cannot go into an HTTP header: every call to the expert would fail with the
    HTTP library's error, and a client key could never be sent. Said at load, naming the variable only. A key that
    is not ASCII passed, and then never matched (the service reads header bytes as Latin-1; the SDK refuses it)."""
    monkeypatch.setenv("MOE_TEST_KEY", f"sk-SECRET{inside}VALUE\n")
    raw = {"version": 1, "experts": [expert(api_key_env="MOE_TEST_KEY")],
           "security": {"api_keys_env": "MOE_TEST_KEY", "admin_key_env": "MOE_TEST_KEY"}}
    found = problems(raw)
    for key in ("experts[0] (alpha).api_key_env", "security.api_keys_env", "security.admin_key_env"):
        assert found[key].startswith("environment variable MOE_TEST_KEY holds a control character"), found
    assert "SECRET" not in repr(found)
    parse_config(raw, check_env=False)  # moe config check --no-env, moe train
    monkeypatch.setenv("MOE_TEST_KEY", "sk-one, sk-two\t2")  # a tab is allowed in a header value
    parse_config(raw)


def test_credentials_in_the_endpoint_and_a_bearer_key_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_TEST_KEY", "k")
    raw = {"version": 1, "experts": [expert(endpoint="http://user:pw@host:9/v1", api_key_env="MOE_TEST_KEY")]}
    assert "only one Authorization" in problems(raw)["experts[0] (alpha).endpoint"]
    parse_config({"version": 1, "experts": [expert(endpoint="http://user:pw@host:9/v1")]})  # one of them: fine


def test_a_nested_router_config_that_does_not_exist_is_a_problem(tmp_path: Path) -> None:
    raw = {"version": 1, "experts": [{"name": "science", "type": "router", "model": "auto",
                                      "router_config": "science.yaml"}]}
    for check_env in (True, False):  # not a variable: moe config check --no-env looks for the file too
        assert f"no config file at {tmp_path / 'science.yaml'}" in problems(raw, base_dir=tmp_path,
                                                                          check_env=check_env)[
            "experts[0] (science).router_config"]
    (tmp_path / "science.yaml").write_text("version: 1\n")  # there, but no config a router could be built from
    assert "science.yaml: experts: Field required" in problems(raw, base_dir=tmp_path)[
        "experts[0] (science).router_config"]
    (tmp_path / "science.yaml").write_text("version: 1\nexperts:\n  - {name: physics, type: vllm, "
                                            "endpoint: 'http://127.0.0.1:9/v1', model: m}\n")
    parse_config(raw, base_dir=tmp_path)


def test_redis_state_needs_its_url_variable_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOE_TEST_REDIS", raising=False)
    raw = {"version": 1, "experts": [expert()], "state": {"backend": "redis", "url_env": "MOE_TEST_REDIS"}}
    assert "MOE_TEST_REDIS is not set" in problems(raw)["state.url_env"]
    monkeypatch.setenv("MOE_TEST_REDIS", "redis://127.0.0.1:6379/0")
    parse_config(raw)


def test_a_base_dir_key_is_refused_rather_than_overwritten() -> None:
    assert "unknown key" in problems({"version": 1, "experts": [expert()], "base_dir": "/etc"})["base_dir"]


def test_a_panel_larger_than_max_attempts_is_refused() -> None:
    raw = {"version": 1, "experts": [expert(), expert(name="beta"), expert(name="gamma")],
           "gate": {"top_k": {"k": 3}}, "fallback": {"max_attempts": 1}}
    assert "1 is below gate.top_k.k (3)" in problems(raw)["fallback.max_attempts"]
    assert parse_config({**raw, "fallback": {"max_attempts": 3}}).fallback.max_attempts == 3


@pytest.mark.parametrize(("endpoint", "says"), [
    ("http://h:8000/v1?api-version=2024-02-01", "has a query string (?...): the client appends /chat/completions"),
    ("http://h:8000/v1#frag", "has a fragment (#...): the client appends /chat/completions"),
    ("http://h:8000/v1/chat/completions", "ends in /chat/completions, which the client appends itself: give the "
                                          "base URL (http://h:8000/v1)"),
    ("http://h:8000/v1/completions/", "ends in /completions, which the client appends itself"),
    ("http://:8000/v1", "has no host"),
    ("http://h:99999/v1", "port 99999 is not a port number from 1 to 65535"),
    ("http://h:0/v1", "port 0 is not a port number"),
    ("http://h:\u00b2/v1", "port \u00b2 is not a port number"),  # a digit to isdigit(), not to int(): it raised
    ("http://h:\u0668\u0660/v1", "is not a port number"),  # Arabic-Indic 80: int() reads it, a URL does not
    ("http://[::1/v1", "is not a valid URL"),
    # Each failed every call before connecting ("label too long", reported as a garbled reply).
    (f"http://{'a' * 64}.example:8000/v1", "is not a host name a resolver can look up: a label (the part between "
                                           "dots) is over 63 characters"),
    ("http://a..b:8000/v1", "host a..b is not a host name a resolver can look up: it has an empty label"),
    ("http://.a:8000/v1", "it has an empty label"),
])
def test_an_endpoint_the_client_cannot_build_on_is_refused_with_the_reason(endpoint: str, says: str) -> None:
    """The client appends /chat/completions to the endpoint: each of these passed ``moe config check`` and then
    failed every request with a 503."""
    found = problems({"version": 1, "experts": [expert(), expert(name="beta", endpoint=endpoint)]})
    assert says in found["experts[1] (beta).endpoint"]
    assert list(found) == ["experts[1] (beta).endpoint"]


@pytest.mark.parametrize("endpoint", ["http://vllm-math:8000/v1", "http://[::1]:8000/v1", "http://10.0.0.7:8000/v1",
                                      "http://[fe80::1%25eth0]:8000/v1", "http://bücher.example:8000/v1",
                                      f"http://{'a' * 63}.example.:8000/v1"])
def test_a_host_a_resolver_can_look_up_passes(endpoint: str) -> None:
    assert parse_config({"version": 1, "experts": [expert(endpoint=endpoint)]}).experts[0].endpoint == endpoint


def test_an_endpoint_message_never_repeats_its_credentials() -> None:
    found = problems({"version": 1, "experts": [expert(endpoint="http://user:s3cr3t@h:9/v1/chat/completions?k=v")]})
    assert "give the base URL (http://h:9/v1)" in found["experts[0] (alpha).endpoint"]
    assert "s3cr3t" not in str(found) and "k=v" not in str(found)


@pytest.mark.parametrize(("password", "tail"), [
    ("Pw9x/Zz8+Q==", "/v1/chat/completions"), ("s3cr3t#Frag", "/v1"), ("s3cr?3t", "/v1"), ("1234/s3cr3t", "/v1"),
    ("p@ss/w]rd[", "/v1")])
def test_an_endpoint_password_holding_a_delimiter_is_named_never_shown(monkeypatch: pytest.MonkeyPatch,
                                                                       password: str, tail: str) -> None:
    """An unencoded '/', '?' or '#' ends the URL's authority early: a parser reads the password's start as the
    port, the rest as a path, query or fragment. The problem is named, and no part of the password is shown."""
    monkeypatch.setenv("MOE_TEST_PW", password)
    found = problems({"version": 1, "experts": [expert(endpoint=f"http://bob:${{MOE_TEST_PW}}@h:9{tail}")]})
    message = found["experts[0] (alpha).endpoint"]
    assert message.startswith("has a '@' past its host: a '/', '?' or '#' in its user:password@ ends the host "
                              "early; percent-encode them (%2F, %3F, %23, and a '@' as %40)")
    pieces = {password, *password.replace("?", "/").replace("#", "/").split("/")} - {""}
    assert not [piece for piece in pieces if piece in str(found)]
    monkeypatch.setenv("MOE_TEST_PW", password.replace("@", "%40").replace("/", "%2F").replace("?", "%3F")
                       .replace("#", "%23"))
    parse_config({"version": 1, "experts": [expert(endpoint="http://bob:${MOE_TEST_PW}@h:9/v1")]})


@pytest.mark.parametrize(("section", "key"), [("experts", "api_key_env"), ("security", "api_keys_env"),
                                              ("security", "admin_key_env"), ("state", "url_env")])
def test_a_secret_pasted_where_a_variable_name_belongs_is_never_repeated(section: str, key: str) -> None:
    pasted = "sk-proj-PASTED-abc123"
    raw: dict[str, object] = {"version": 1, "experts": [expert()]}
    if section == "experts":
        raw["experts"] = [expert(api_key_env=pasted)]
    else:
        raw[section] = {key: pasted}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert pasted not in str(info.value)
    where = "experts[0] (alpha).api_key_env" if section == "experts" else f"{section}.{key}"
    example = dict([*ENV_EXAMPLES, ("api_key_env", "OPENAI_API_KEY")])[key]
    assert info.value.problems == [(where, "is not an environment variable's name (letters, digits and _, not "
                                           "starting with a digit): write the name of the variable that holds the "
                                           f"secret ({key}: {example}), never the secret itself")]


# Tokens whose alphabet fits a variable's name: Hugging Face's, Groq's, a hex key. Made up, of the real shapes.
PASTED_NAMES = ["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", "gsk_4fG7hJ2kL9mN3pQ8rS1tU6vW0xY5zA2bC4dE",
                "a3f9c2e17b4d8f60a3f9c2e17b4d8f60a3f9c2e1"]


@pytest.mark.parametrize("pasted", PASTED_NAMES)
@pytest.mark.parametrize(("section", "key"), [("experts", "api_key_env"), ("security", "api_keys_env"),
                                              ("security", "admin_key_env"), ("state", "url_env")])
def test_a_secret_that_is_also_a_valid_name_is_not_repeated_as_an_unset_variable(
        section: str, key: str, pasted: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pasted, raising=False)
    raw: dict[str, object] = {"version": 1, "experts": [expert()]}
    if section == "experts":
        raw["experts"] = [expert(api_key_env=pasted)]
    else:
        raw[section] = {key: pasted, **({"backend": "redis"} if section == "state" else {})}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert pasted not in str(info.value)
    [message] = [m for path, m in info.value.problems if path.endswith(key)]
    assert "looks like a secret pasted in place of a variable's name" in message
    assert f"({len(pasted)} characters of mixed letters and digits, not repeated here)" in message


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "MOE_TEST_UNSET_KEY_FOR_SERVICE_2024", "my_service_api_key_v2",
                                  "HUGGINGFACE_HUB_TOKEN", "AzureOpenAIKey"])
def test_an_ordinary_unset_variable_is_named(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(name, raising=False)
    assert problems({"version": 1, "experts": [expert(api_key_env=name)]})["experts[0] (alpha).api_key_env"] == (
        f"environment variable {name} is not set")


def test_a_secret_looking_name_that_is_set_is_a_name() -> None:
    from router.config.checks import looks_like_secret, variable_state

    name = PASTED_NAMES[0]
    assert looks_like_secret(name)
    assert variable_state(name, is_set=True) == f"environment variable {name} is empty"


def test_admin_off_for_an_unset_secret_looking_variable_does_not_repeat_it() -> None:
    from router.security import _admin_missing

    assert PASTED_NAMES[1] not in _admin_missing(PASTED_NAMES[1], {})
    assert _admin_missing("MOE_ADMIN_KEY", {}) == "the variable security.admin_key_env names (MOE_ADMIN_KEY) is not set"


@pytest.mark.parametrize("endpoint", ["http://h:8000", "https://h/openai/", "http://[::1]:65535/api/v1",
                                      "http://user:pw@h:1/v1"])
def test_an_endpoint_need_not_end_in_v1(endpoint: str) -> None:
    assert parse_config({"version": 1, "experts": [expert(endpoint=endpoint)]}).experts[0].endpoint == endpoint


def test_a_host_left_blank_by_an_unset_variable_is_reported_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOE_TEST_UNSET_DIR", raising=False)
    with pytest.raises(ConfigError) as info:
        parse_config({"version": 1, "experts": [expert(endpoint="http://${MOE_TEST_UNSET_DIR}/v1")]})
    assert [path for path, _ in info.value.problems] == ["experts[0] (alpha).endpoint"]  # not also as hostless


def test_an_unset_variable_is_one_problem_named_as_its_expert_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the "" an unset variable leaves then fails (too short a model, no number, no endpoint) is not a second
    problem at the same key under another spelling of its path; three unset variables were six problems."""
    for name in ("MOE_T_ENDPOINT", "MOE_T_MODEL", "MOE_T_TIMEOUT", "MOE_T_NAME"):
        monkeypatch.delenv(name, raising=False)
    raw = {"version": 1, "experts": [
        expert(type="openai", endpoint="${MOE_T_ENDPOINT}", model="${MOE_T_MODEL}", timeout_s="${MOE_T_TIMEOUT}"),
        expert(name="${MOE_T_NAME}")]}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert [(path, message.split(" is not set")[0]) for path, message in info.value.problems] == [
        ("experts[0] (alpha).endpoint", "environment variable MOE_T_ENDPOINT"),
        ("experts[0] (alpha).model", "environment variable MOE_T_MODEL"),
        ("experts[0] (alpha).timeout_s", "environment variable MOE_T_TIMEOUT"),
        ("experts[1].name", "environment variable MOE_T_NAME")]


@pytest.mark.parametrize(("key", "holds"), [("api_keys_env", "the client keys"), ("admin_key_env", "the admin key")])
def test_security_key_variables_must_be_set_when_the_environment_is_checked(
        monkeypatch: pytest.MonkeyPatch, key: str, holds: str) -> None:
    """Unset, the service starts and refuses every call (401 on /v1, 403 on /admin): say so at load."""
    monkeypatch.delenv("MOE_TEST_SECURITY_KEY", raising=False)
    raw = {"version": 1, "experts": [expert()], "security": {key: "MOE_TEST_SECURITY_KEY"}}
    message = problems(raw)[f"security.{key}"]
    assert message.startswith("environment variable MOE_TEST_SECURITY_KEY is not set") and holds in message
    parse_config(raw, check_env=False)  # moe config check --no-env, moe train
    monkeypatch.setenv("MOE_TEST_SECURITY_KEY", "  ")
    assert "MOE_TEST_SECURITY_KEY is empty" in problems(raw)[f"security.{key}"]
    monkeypatch.setenv("MOE_TEST_SECURITY_KEY", "sk-SECRETVALUE-1")
    assert parse_config(raw).security.model_dump()[key] == "MOE_TEST_SECURITY_KEY"


def test_a_fixed_panel_larger_than_the_experts_is_refused() -> None:
    raw = {"version": 1, "experts": [expert(), expert(name="beta")],
           "gate": {"top_k": {"k": 3}}, "fallback": {"max_attempts": 3}}
    assert problems(raw)["gate.top_k.k"] == ("3 is more than the 2 expert(s) defined: a fixed panel of 3 can never "
                                             "be filled; lower k to at most 2")
    assert parse_config({**raw, "gate": {"top_k": {"k": 2}}}).gate.top_k.cap == 2
    # the other policies size the panel themselves; k only caps it
    assert parse_config({**raw, "gate": {"top_k": {"policy": "mass", "k": 3}}}).gate.top_k.cap == 3


def test_a_nested_router_counts_as_one_expert_of_the_panel(tmp_path: Path) -> None:
    (tmp_path / "inner.yaml").write_text("version: 1\n")
    nested = {"name": "inner", "type": "router", "model": "auto", "router_config": "inner.yaml"}
    raw = {"version": 1, "experts": [expert(), nested], "gate": {"top_k": {"k": 3}}, "fallback": {"max_attempts": 3}}
    assert "more than the 2 expert(s)" in problems(raw, base_dir=tmp_path)["gate.top_k.k"]


def test_a_config_that_is_not_utf8_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("version: 1\n# caf\u00e9\nexperts: []\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path, check_env=False)
    assert info.value.source == str(path) and str(path) in str(info.value)
    assert info.value.problems == [("<file>", "not UTF-8 text: byte 0xe9 on line 2 cannot be decoded; save the file "
                                              "as UTF-8")]


@pytest.mark.parametrize("url", ["localhost:6379", "http://redis:6379/0", "SECRETVALUE"])
def test_a_redis_url_variable_that_holds_no_redis_url_is_named_without_its_value(
        monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("MOE_TEST_REDIS", url)
    raw = {"version": 1, "experts": [expert()], "state": {"backend": "redis", "url_env": "MOE_TEST_REDIS"}}
    message = problems(raw)["state.url_env"]
    assert message.startswith("environment variable MOE_TEST_REDIS does not hold a Redis URL (its scheme is ")
    assert "SECRETVALUE" not in message and "6379" not in message
    for good in ("redis://:pw@redis:6379/0", "rediss://h:6380", "unix:///run/redis.sock"):
        monkeypatch.setenv("MOE_TEST_REDIS", good)
        assert parse_config(raw).state.url_env == "MOE_TEST_REDIS"


def test_a_tls_option_on_a_plain_redis_url_is_named_by_moe_config_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ssl_* option on a redis:// URL passed moe config check; moe serve and moe train then refused it (once
    redis-py's connection took it for an unknown argument)."""
    monkeypatch.setenv("MOE_TEST_REDIS", "redis://:s3cret-pw@h:6379/0?ssl_cert_reqs=none&socket_timeout=2")
    raw = {"version": 1, "experts": [expert()], "state": {"backend": "redis", "url_env": "MOE_TEST_REDIS"}}
    message = problems(raw)["state.url_env"]
    assert message == ("environment variable MOE_TEST_REDIS holds a redis:// URL with the TLS option(s) "
                       "'ssl_cert_reqs', which only a rediss:// URL takes: use rediss:// for TLS, or leave them out")
    monkeypatch.setenv("MOE_TEST_REDIS", "rediss://:s3cret-pw@h:6380/0?ssl_cert_reqs=none")
    assert parse_config(raw).state.url_env == "MOE_TEST_REDIS"


@pytest.mark.parametrize(("url", "says"), [
    ("redis://:RedisPw9x/Zz8+Q==@127.0.0.1:6390/0", "with a '@' past its host"),
    ("redis://default:Pw#9x@h:6379/0", "with a '@' past its host"),
    ("rediss://u:p@w/9x?y@h:6380", "with a '@' past its host"),
    ("redis://h:RedisPw9x/0", "whose host or port cannot be read"),
    ("redis://h:99999/0", "whose host or port cannot be read"),
])
def test_a_redis_url_redis_cannot_read_is_named_by_its_variable_never_its_value(
        monkeypatch: pytest.MonkeyPatch, url: str, says: str) -> None:
    """A password holding an unencoded '/' passed moe config check, and moe serve then died with redis-py's
    "Port could not be cast to integer value as '<the password's start>'", naming neither the field nor the
    variable. Both now name the variable, and no part of its value."""
    from router.config import StateConfig
    from router.state_redis import build_shared_state

    monkeypatch.setenv("MOE_TEST_REDIS", url)
    raw = {"version": 1, "experts": [expert()], "state": {"backend": "redis", "url_env": "MOE_TEST_REDIS"}}
    message = problems(raw)["state.url_env"]
    assert message.startswith(f"environment variable MOE_TEST_REDIS holds a Redis URL {says}")
    state = StateConfig(backend="redis", url_env="MOE_TEST_REDIS")
    with pytest.raises(ConfigError) as info:
        build_shared_state(state, {"MOE_TEST_REDIS": url})
    assert info.value.problems == [("state.url_env", message)]
    assert not [part for part in ("RedisPw9x", "Pw#9x", "p@w", "9x", "99999") if part in message]


@pytest.mark.parametrize("store", ["shared state", "feedback"])
def test_a_redis_url_option_redis_cannot_read_is_named_by_its_variable_never_its_value(store: str) -> None:
    """What the check before it lets through, redis-py may still refuse as it parses the URL (an option's value):
    its message is replaced by one naming the variable."""
    from router.config import StateConfig
    from router.state_redis import RedisFeedbackStore, build_shared_state

    url = "redis://:s3cret@h:6379/0?health_check_interval=s3cret"
    state = StateConfig(backend="redis", url_env="MOE_TEST_REDIS")
    build = build_shared_state if store == "shared state" else RedisFeedbackStore.from_config
    with pytest.raises(ConfigError) as info:
        build(state, {"MOE_TEST_REDIS": url})
    (where, message), = info.value.problems
    assert where == "state.url_env" and "MOE_TEST_REDIS holds a URL redis-py cannot read" in message
    assert "s3cret" not in str(info.value) and info.value.__cause__ is None and info.value.__suppress_context__


def test_an_expert_may_not_take_the_name_that_routes() -> None:
    found = problems({"version": 1, "experts": [expert(name="auto"), expert(name="beta")]})
    assert "'auto' is reserved" in found["experts[0] (auto).name"]


def test_an_expert_named_like_the_default_service_name_is_named_as_the_problem() -> None:
    # Without service: the default name, 'moe-router', still routes; the problem is the expert's name.
    found = problems({"version": 1, "experts": [expert(name="beta"), expert(name="moe-router")]})
    assert list(found) == ["experts[1] (moe-router).name"]
    assert "the service's own model name" in found["experts[1] (moe-router).name"]
    found = problems({"version": 1, "service": {"name": "beta"}, "experts": [expert(name="beta"), expert()]})
    assert found == {"service.name": "'beta' is also an expert's name"}


def test_an_empty_artifact_path_is_refused() -> None:
    found = problems({"version": 1, "gate": {"artifact": ""}, "experts": [expert(), expert(name="beta")]})
    assert "gate.artifact" in found


@pytest.mark.parametrize("model", ["${HOME", "m-${1BAD}", "${}", "${MOE_TEST_UNSET:-${HOME}}"])
def test_a_dollar_brace_that_starts_no_reference_is_refused(model: str) -> None:
    found = problems({"version": 1, "experts": [expert(model=model), expert(name="beta")]})
    assert "starts no variable reference" in found["experts[0].model"]


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """As with the shell's and compose's ``:-`` (and the MOE_* settings): ``${VAR:-default}`` gives the default
    when VAR is set but empty, and an empty ``${VAR}`` without a default is a problem like an unset one."""
    monkeypatch.setenv("MOE_TEST_EMPTY", "")
    raw = {"version": 1, "service": {"host": "${MOE_TEST_EMPTY:-127.0.0.1}", "port": "${MOE_TEST_EMPTY:-8123}"},
           "experts": [expert(endpoint="http://${MOE_TEST_EMPTY:-127.0.0.1:9}/v1")]}
    config = parse_config(raw)
    assert (config.service.host, config.service.port) == ("127.0.0.1", 8123)
    assert config.experts[0].endpoint == "http://127.0.0.1:9/v1"
    found = problems({"version": 1, "experts": [expert()], "gate": {"artifact": "${MOE_TEST_EMPTY}/gate"}})
    assert found["gate.artifact"].startswith("environment variable MOE_TEST_EMPTY is empty (which counts as unset) "
                                             "and ${MOE_TEST_EMPTY} has no default")
    monkeypatch.setenv("MOE_TEST_EMPTY", "9001")  # a set variable wins over the default
    assert parse_config(raw).service.port == 9001


def test_an_empty_service_host_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """"" binds every interface, as 0.0.0.0 does: never what a blank value meant."""
    for host in ("", "  "):
        assert "must not be empty" in problems({"version": 1, "experts": [expert()], "service": {"host": host}})[
            "service.host"]
    # An unset ${VAR} is reported as unset, once; moe compose, whose containers get the variables, passes it on.
    monkeypatch.delenv("MOE_TEST_UNSET_HOST", raising=False)
    raw = {"version": 1, "experts": [expert()], "service": {"host": "${MOE_TEST_UNSET_HOST}"}}
    assert list(problems(raw)) == ["service.host"] and "is not set" in problems(raw)["service.host"]
    assert parse_config(raw, require_vars=False).service.host == ""


MERGED = """\
version: 1
experts:
  - &alpha {name: alpha, type: vllm, endpoint: "http://127.0.0.1:9/v1", model: m, timeout_s: 10}
  - <<: *alpha
    name: beta
    endpoint: "http://127.0.0.1:10/v1"
  - <<: [*alpha]
    name: gamma
"""


def test_yaml_merge_keys_work_and_an_explicit_key_overrides_a_merged_one(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(MERGED)
    config = load_config(path, check_env=False)
    assert [(e.name, e.endpoint, e.timeout_s) for e in config.experts] == [
        ("alpha", "http://127.0.0.1:9/v1", 10), ("beta", "http://127.0.0.1:10/v1", 10),
        ("gamma", "http://127.0.0.1:9/v1", 10)]


def test_a_key_that_is_not_a_string_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    error = load_refused(tmp_path / "keys.yaml", "version: 1\nexperts:\n  - {name: a, type: vllm, endpoint: "
                         "'http://h:9/v1', model: m, 5: x}\ngate: {on: 1}\n8000: oops\n")
    assert error.problems == [
        ("experts[0]", "mapping keys must be strings: 5 is int (quote it, or check the indentation)"),
        ("gate", "mapping keys must be strings: True is bool (quote it, or check the indentation)"),
        ("<root>", "mapping keys must be strings: 8000 is int (quote it, or check the indentation)")]
    assert "mapping keys must be strings: 1 is int" in problems({"version": 1, "experts": [expert()], 1: "x"})[
        "<root>"]


def test_a_sequence_as_a_key_is_refused_naming_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "list-key.yaml"
    (where, message), = load_refused(path, "version: 1\nexperts:\n  - {name: a, type: vllm, endpoint: "
                                           "'http://h:9/v1', model: m}\n[x, y]: 1\n").problems
    assert where == "<yaml>" and "found a list as a key: mapping keys must be strings" in message
    assert f'in "{path}", line 4' in message


def test_a_pydantic_error_whose_place_starts_with_an_index_is_named() -> None:
    from pydantic import ValidationError

    from router.config.checks import pydantic_problems

    exc = ValidationError.from_exception_data("RouterConfig", [{"type": "missing", "loc": (3, "name"), "input": {}}])
    assert pydantic_problems(exc, {}) == [("3.name", "Field required")]


@pytest.mark.parametrize(("section", "key"), [
    (None, "version"), ("service", "port"), ("fallback", "max_attempts"), ("fallback", "retries"),
    ("fallback", "deadline_s"), ("experts", "max_concurrency"), ("experts", "timeout_s"), ("encoder", "batch_size"),
    ("encoder", "max_length"), ("combiner", "vote_l2"), ("top_k", "k"), ("breaker", "failure_rate"),
])
def test_a_boolean_is_refused_where_a_number_belongs(section: str | None, key: str) -> None:
    """YAML reads yes/no, on/off and true/false as booleans, and pydantic's lax mode reads True as 1: ``port: yes``
    once loaded as port 1."""
    raw: dict[str, object] = {"version": 1, "experts": [expert()]}
    if section is None:
        raw[key], where = True, key
    elif section == "experts":
        raw["experts"], where = [expert(**{key: True})], f"experts[0] (alpha).{key}"
    elif section in ("encoder", "top_k"):
        raw["gate"], where = {section: {key: True}}, f"gate.{section}.{key}"
    elif section == "breaker":
        raw["fallback"], where = {"breaker": {key: True}}, f"fallback.breaker.{key}"
    else:
        raw[section], where = {key: True}, f"{section}.{key}"
    assert problems(raw, check_env=False)[where] == ("true is a boolean, not a number (YAML reads yes/no, on/off and "
                                                     "true/false as booleans); write a number")


def test_text_yaml_read_as_a_boolean_number_or_date_is_named_with_the_remedy(tmp_path: Path) -> None:
    """CLINC150 has intents "yes" and "no": as unquoted expert names YAML reads them as booleans, and the message
    was pydantic's "Input should be a valid string", naming neither the value nor why."""
    path = tmp_path / "router.yaml"
    path.write_text("version: 1\nexperts:\n"
                    + "".join(f"  - {{name: {name}, type: openai, endpoint: 'http://h:8000/v1', model: {model}}}\n"
                              for name, model in (("no", "m"), ("'ok'", "3.5"), ("1:30", "m"), ("2024-05-01", "m"))))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    found = dict(info.value.problems)
    assert found == {
        "experts[0].name": "should be text, but YAML read it as false, a boolean (unquoted, yes/no, on/off and "
                           "true/false are booleans): put the value in quotes",
        "experts[1] (ok).model": "should be text, but YAML read it as 3.5, a number (unquoted, digits are a number, "
                                 "and 1:30 is read as 90): put the value in quotes",
        "experts[2].name": "should be text, but YAML read it as 90, a number (unquoted, digits are a number, and 1:30 "
                           "is read as 90): put the value in quotes",
        "experts[3].name": "should be text, but YAML read it as 2024-05-01, a date (unquoted, 2024-05-01 is a date): "
                           "put the value in quotes"}
    assert "valid string" in problems({"version": 1, "experts": [expert(model=["m"])]})["experts[0] (alpha).model"]


@pytest.mark.parametrize(("name", "says"), [("has space", "holds ' '"), ("-lead", "starts with '-'"),
                                          ("x" * 129, "is 129 characters long"), ("caf\u00e9", "holds '\u00e9'")])
def test_a_name_outside_the_rule_is_refused_in_words(name: str, says: str) -> None:
    """The message was the pattern itself ("String should match pattern '^[A-Za-z0-9]...'")."""
    found = problems({"version": 1, "experts": [expert(name=name)]})
    assert list(found.values()) == [f"{says}: a name is 1 to 128 of the characters A-Z a-z 0-9 . _ @ / : + -, "
                                    "starting with a letter or digit (names appear in URLs, metric labels and logs)"]


def test_numbers_from_variables_and_booleans_for_flags_still_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_TEST_PORT", "9001")
    config = parse_config({"version": 1, "experts": [expert(timeout_s=5)],
                           "service": {"port": "${MOE_TEST_PORT}", "log_content": True},
                           "fallback": {"enabled": False, "max_attempts": "${MOE_TEST_UNSET:-2}"}})
    assert (config.service.port, config.service.log_content, config.fallback.max_attempts) == (9001, True, 2)
    assert config.experts[0].timeout_s == 5.0 and config.fallback.enabled is False


REPLAY = {"source": "routerbench", "path": "recordings"}


@pytest.mark.parametrize(("fields", "key", "says"), [
    ({"type": "openai", "replay": REPLAY}, "replay", "only a type: replay expert plays recordings; this one is type"),
    ({"type": "replay", "replay": REPLAY}, "endpoint", "a type: replay expert answers from its recordings and calls "
                                                       "no endpoint"),
])
def test_a_block_the_expert_s_type_never_reads_is_a_problem_not_ignored(fields: dict[str, object], key: str,
                                                                        says: str) -> None:
    """As a vllm block on another type is: an edit that changes an expert's type would otherwise leave a block that
    does nothing, and the config would look as if it did."""
    found = problems({"version": 1, "experts": [expert(**fields)]}, check_env=False)
    assert list(found) == [f"experts[0] (alpha).{key}"] and found[f"experts[0] (alpha).{key}"].startswith(says)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8000/v1", "user:s3cret@host:8000/v1", "http://host:8000/v1 x"])
def test_an_endpoint_that_is_no_http_url_is_said_in_words_without_its_value(endpoint: str) -> None:
    found = problems({"version": 1, "experts": [expert(endpoint=endpoint)]}, check_env=False)
    assert found == {"experts[0] (alpha).endpoint": "is not an http:// or https:// URL (with no spaces): write the "
                                                    "base URL the client appends /chat/completions to, e.g. "
                                                    "http://host:8000/v1"}


def test_relative_paths_resolve_against_the_folder_the_config_s_path_names_not_a_link_s_target(tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap's file as a symlink into a timestamped folder: `../artifacts/gate` must mean
    the folder beside the one the config was given from, as compose and a reader of the path take it."""
    real = tmp_path / "configs" / "..2026_12_06" / "router.yaml"
    real.parent.mkdir(parents=True)
    real.write_text("version: 1\ngate: {artifact: ../artifacts/gate}\nexperts:\n"
                    "  - {name: a, type: vllm, endpoint: 'http://127.0.0.1:9/v1', model: m}\n")
    link = tmp_path / "configs" / "router.yaml"
    link.symlink_to(real)
    config = load_config(link, check_env=False)
    assert config.resolve(config.gate.artifact) == tmp_path / "artifacts" / "gate"


@pytest.mark.parametrize(("text", "says"), [
    # "Billion laughs": nine levels, each aliasing the one before nine times (9**9 values); it ran past 20 s and
    # 850 MB while the loader copied it.
    ("a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)),
     "expands to more than 1,000,000 values"),
    ("x: &a [*a]\n", "a value contains itself"),  # recursed without end
    ("x: " + "[" * 900 + "]" * 900 + "\n", "nested too deeply for the parser"),  # a RecursionError traceback
    ("x: " + "[" * 150 + "]" * 150 + "\n", "nested more than 100 levels deep"),
])
def test_a_config_too_big_deep_or_self_containing_is_one_clear_problem(tmp_path: Path, text: str,
                                                                       says: str) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, check_env=False)
    assert len(info.value.problems) == 1 and says in info.value.problems[0][1]


def test_an_expert_type_that_is_no_string_is_named_not_a_traceback() -> None:
    for kind in (["openai"], {"a": 1}):
        found = problems({"version": 1, "experts": [expert(type=kind)]}, check_env=False)
        assert found["experts[0] (alpha).type"] == "Input should be a valid string"


def test_config_check_loads_a_nested_routers_gate_and_names_its_file_to_train(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`moe config check` said OK for a nested router whose gate serve would refuse, and the remedy named the outer
    file: the nested gate is checked as the outer one is, and the command to run names the nested file."""
    import yaml

    from experts.base import ExpertContext
    from router.cli import main
    from router.config import RouterConfig
    from router.hierarchy import RouterExpert

    inner = tmp_path / "inner.yaml"
    inner.write_text(yaml.safe_dump({"version": 1, "gate": {"artifact": "inner-gate"}, "experts": [
        expert(name="phys", examples=["what is a photon"]), expert(name="chem", examples=["what is a mole"])]}))
    outer = tmp_path / "outer.yaml"
    outer.write_text(yaml.safe_dump({"version": 1, "gate": {"artifact": "outer-gate"}, "experts": [
        expert(examples=["write a sort"]),
        {"name": "science", "type": "router", "model": "auto", "router_config": "inner.yaml"}]}))
    assert main(["config", "check", str(outer), "--no-env"]) == 2
    err = capsys.readouterr().err
    assert (f"experts[1] (science).router_config: {inner}: no trained gate at {tmp_path / 'inner-gate'}; train one "
            f"with: moe train --config {inner}") in err
    # Building the outer router (serve, route) names the nested file too, not the outer one the CLI fills in.
    config: RouterConfig = load_config(outer, check_env=False)
    with pytest.raises(FileNotFoundError) as info:
        RouterExpert(config.expert("science"), ExpertContext(base_dir=tmp_path))
    assert f"moe train --config {inner}" in str(info.value)


def test_a_path_no_file_can_have_is_named_by_its_key(tmp_path: Path) -> None:
    """The OS refuses a NUL character and over-long paths in words that name no key ("embedded null byte",
    "[Errno 36] File name too long: '<the whole path>'"); the config names the key instead. Before, `moe config
    check` stopped at the first, with the OS's words."""
    raw = {"version": 1, "gate": {"artifact": "x" * 5000, "train_data": ["ok.jsonl", "a\0b.jsonl"]},
           "feedback": {"path": "f/" + "n" * 300 + ".sqlite3"},
           "experts": [expert(), {"name": "team", "type": "router", "model": "auto",
                                  "router_config": "r" * 300 + ".yaml"},
                       {"name": "rec", "type": "replay", "model": "m",
                        "replay": {"source": "routerbench", "path": "d\0"}}]}
    found = problems(raw, base_dir=tmp_path)
    assert found["gate.artifact"] == "the path is 5000 bytes long; a path has at most 4096"
    assert found["gate.train_data[1]"] == "the path holds a NUL character, which no file's path can"
    assert found["feedback.path"] == "the path holds a name 308 bytes long; a file or folder name has at most 255"
    assert found["experts[1] (team).router_config"] == \
        "the path holds a name 305 bytes long; a file or folder name has at most 255"
    assert found["experts[2] (rec).replay.path"] == "the path holds a NUL character, which no file's path can"
    assert len(found) == 5  # the nested router's missing file is not reported a second time


def test_a_number_too_long_to_read_is_refused_with_its_place(tmp_path: Path) -> None:
    error = load_refused(tmp_path / "digits.yaml", "version: 1\nfallback:\n  max_attempts: " + "9" * 5000 + "\n")
    [(where, message)] = error.problems
    assert where == "<yaml>"
    assert "a number of 5000 digits; a config's numbers have at most 4300" in message and "line 3" in message


def test_reading_a_config_stops_at_its_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that never ends (/dev/zero) or a file far too large is refused after the limit is read, not read
    without end."""
    import router.config.load

    monkeypatch.setattr(router.config.load, "MAX_CONFIG_BYTES", 2**20)
    big = tmp_path / "big.yaml"
    big.write_text("version: 1\n# " + "x" * 2**20 + "\nexperts: []\n")
    for path in (big, Path("/dev/zero")):
        with pytest.raises(ConfigError) as info:
            load_config(path, check_env=False)
        assert info.value.problems == [("<file>", "larger than 1 MiB: a config is a few KB (training data goes in "
                                                  "the files gate.train_data names)")]


def test_a_long_value_a_variable_gave_is_never_repeated_in_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret put in the wrong key (``type: ${OPENAI_API_KEY}``) is named by its variable, never shown; a short
    value (a port, a name) still is, as it helps more than it risks."""
    monkeypatch.setenv("LEAKY", "sk-live-abcdef0123456789")
    monkeypatch.setenv("SHORT", "chat")
    raw = {"version": 1, "gate": {"default_expert": "${SHORT}"},
           "combiner": {"strategy": "escalate", "escalate_to": "${LEAKY}"},
           "experts": [expert(type="${LEAKY}")]}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, check_env=False)
    text = str(info.value)
    assert "sk-live" not in text and "${LEAKY}" in text
    found = dict(info.value.problems)
    assert found["experts[0] (alpha).type"].startswith("unknown expert type '${LEAKY}'")
    assert found["combiner.escalate_to"].startswith("references expert '${LEAKY}'")
    assert found["gate.default_expert"] == "references expert 'chat', which is not defined"


@pytest.mark.parametrize("url", [
    "https://gw.example.com/v1/tok_9f8e7d6c5b4a39281/chat/completions",
    "https://svc:Zq8pLm2Xr7Tv4Wn9@gw.example.com/v1/tok_9f8e7d6c5b4a39281/chat/completions",
    "https://gw.example.com/v1/tok_9f8e7d6c5b4a39281/chat/completions?api-version=2024-02-15-preview",
    "http://vllm/v1/tok_9f8e7d6c5b4a39281/chat/completions"])
def test_a_long_value_is_not_repeated_quoted_or_in_part(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """The value as Python quotes it (a backslash doubled) is hidden too, and no suggestion is built from a value
    a variable gave (an endpoint's base URL, its path token included, whatever else the value holds); the
    message's own words still read."""
    monkeypatch.setenv("GATEWAY_URL", url)
    monkeypatch.setenv("EXPERT_KIND", "pa\\ss-w0rd-very-secret")
    raw = {"version": 1, "experts": [expert(endpoint="${GATEWAY_URL}"),
                                     expert(name="beta", type="${EXPERT_KIND}")]}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, check_env=False)
    text = str(info.value)
    assert "tok_9f8e" not in text and "w0rd" not in text and "Zq8p" not in text, text
    found = dict(info.value.problems)
    assert found["experts[0] (alpha).endpoint"].endswith(
        "ends in /chat/completions, which the client appends itself: give the base URL without /chat/completions")
    assert found["experts[1] (beta).type"].startswith("unknown expert type '${EXPERT_KIND}'")
    # written in the file, the endpoint's base is still suggested
    written = problems({"version": 1, "experts": [expert(endpoint="http://vllm:8000/v1/chat/completions")]})
    assert written["experts[0] (alpha).endpoint"].endswith("give the base URL (http://vllm:8000/v1)")


def test_version_nan_and_validator_messages_read_as_written() -> None:
    """``version: "1"`` (quoted, or a ${VAR}) is the number 1; another version says which one this release reads;
    NaN says it is not a number (it read "less than or equal to 3600"); a validator's own words come without
    pydantic's "Value error, " before them."""
    assert parse_config({"version": "1", "experts": [expert()]}).version == 1
    assert problems({"version": 2, "experts": [expert()]}) == {
        "version": "must be 1, the schema version this release reads, not 2"}
    assert problems({"version": 1, "experts": [expert(timeout_s=float("nan"))]}) == {
        "experts[0] (alpha).timeout_s": "Input should be a finite number"}
    found = problems({"version": 1, "fallback": {"backoff_base_s": 5, "backoff_max_s": 1}, "experts": [expert()]})
    assert found == {"fallback.backoff_max_s": "must be at least backoff_base_s (5)"}


def test_an_unordered_bound_is_named_beside_its_siblings_errors() -> None:
    """A ``..._max_s`` below its base is refused at its own path, next to the other errors of the same block: a
    model validator ran only once every field was valid, so one bad field hid it until the next try."""
    found = problems({"version": 1, "fallback": {"backoff_base_s": 5, "backoff_max_s": 1, "breaker": {
        "cooldown_s": 10, "cooldown_max_s": 1, "half_open_probes": 0}}, "experts": [expert()]})
    assert found == {"fallback.backoff_max_s": "must be at least backoff_base_s (5)",
                     "fallback.breaker.cooldown_max_s": "must be at least cooldown_s (10)",
                     "fallback.breaker.half_open_probes": "Input should be greater than or equal to 1"}
    # a base raised past the bound's default is refused too, not capped below itself at run time (a field
    # validator skips a default unless told otherwise)
    assert problems({"version": 1, "fallback": {"backoff_base_s": 30, "breaker": {"cooldown_s": 600}},
                     "experts": [expert()]}) == {
        "fallback.backoff_max_s": "must be at least backoff_base_s (30)",
        "fallback.breaker.cooldown_max_s": "must be at least cooldown_s (600)"}
    # a refused base is reported once, by itself, not again through the bound that depends on it
    assert problems({"version": 1, "fallback": {"backoff_base_s": -1, "backoff_max_s": 1}, "experts": [expert()]}) == {
        "fallback.backoff_base_s": "Input should be greater than 0"}


def test_a_blank_example_is_refused_by_its_path() -> None:
    """An empty or whitespace example would be embedded as nothing and claim a share of every query (it took 0.32
    of an unrelated one as a cold-start expert's only example); it is refused where it stands."""
    found = problems({"version": 1, "experts": [expert(examples=["what is 2+2?", "", " \n\t", "\u200b\u200b"])]})
    blank = "an example is blank: give a query this expert should answer, or leave the entry out"
    assert [path for path, message in found.items() if message.startswith(blank)] == [
        "experts[0] (alpha).examples[1]", "experts[0] (alpha).examples[2]",
        "experts[0] (alpha).examples[3]"]  # zero-width characters alone: the encoder drops them, as the service does
    assert len(found) == 3, found


def test_an_unset_variable_leaves_the_rest_of_a_partly_written_value_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what the blank causes is left out: an endpoint written around the variable still has its query string
    and its /chat/completions named."""
    monkeypatch.delenv("MOE_T_HOST", raising=False)
    with pytest.raises(ConfigError) as info:
        parse_config({"version": 1, "experts": [expert(endpoint="http://${MOE_T_HOST}/v1/chat/completions?k=1")]})
    [(unset_path, unset), (path, rest)] = info.value.problems
    assert unset_path == path == "experts[0] (alpha).endpoint"
    assert "MOE_T_HOST is not set" in unset and "has a query string" in rest and "ends in /chat/completions" in rest


@pytest.mark.parametrize("k", ["3", 3.0, "${PANEL_K}"])
@pytest.mark.parametrize("other_problem", [False, True])
def test_a_count_written_as_text_or_a_float_is_cross_checked_as_the_number_it_is(
        k: object, other_problem: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The schema reads "3" (quoted, or a ${VAR}'s value) and 3.0 as 3; so does the cross-check. It read them as
    no number at all, and the schema's own cross-check, which found the problem, was reported as a bare
    "<root>: invalid config" (or not at all beside another problem)."""
    monkeypatch.setenv("PANEL_K", "3")
    raw: dict[str, object] = {"version": 1, "experts": [expert(name="a"), expert(name="b")],
                              "gate": {"top_k": {"k": k}}, "fallback": {"max_attempts": 3.0}}
    if other_problem:
        raw["service"] = {"port": "nope"}
    found = problems(raw)
    shown = "k" if k == "${PANEL_K}" else "3"  # a variable's value is never repeated, however short
    assert found["gate.top_k.k"] == (f"{shown} is more than the 2 expert(s) defined: a fixed panel of {shown} can "
                                     "never be filled; lower k to at most 2")
    assert "<root>" not in found and ("service.port" in found) == other_problem


@pytest.mark.parametrize("value", ["0031415926535", " 31415926535 ", "00000000000000000003"])
def test_a_count_a_variable_gives_is_never_repeated(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cross-check printed the count a ${VAR} gave, normalised ("0031415926535" as 31415926535), where the
    check that no long variable value is echoed looks for it as written."""
    monkeypatch.setenv("PANEL_K", value)
    monkeypatch.setenv("MAX_TRIES", "0000000002")
    raw = {"version": 1, "experts": [expert(name="a"), expert(name="b")],
           "gate": {"top_k": {"k": "${PANEL_K}"}}, "fallback": {"max_attempts": "${MAX_TRIES}"}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    text = str(info.value)
    assert "31415926535" not in text and value.strip().lstrip("0") not in text.replace("at most 2", "")


def test_max_attempts_written_as_a_float_is_checked_against_k() -> None:
    raw = {"version": 1, "experts": [expert(name="a"), expert(name="b")], "gate": {"top_k": {"k": 2}},
           "fallback": {"max_attempts": 1.0}}
    assert problems(raw)["fallback.max_attempts"].startswith("1 is below gate.top_k.k (2)")


def test_what_only_the_schema_s_cross_check_sees_is_reported_under_its_path() -> None:
    """A value the schema converts into one the cross-check refuses (YAML's !!binary bytes into a name) is found by
    the schema's cross-check alone; it is reported there, not as "<root>: invalid config"."""
    raw = {"version": 1, "experts": [expert(name="a"), expert(name="b")], "gate": {"default_expert": b"c"}}
    assert problems(raw) == {"gate.default_expert": "references expert 'c', which is not defined"}
