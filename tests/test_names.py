"""Hostile names, on both sides: the trainer's checks and the server's resolver and middleware.

Property-based (hypothesis) over arbitrary text, plus a table of the known tricks:
``..``, absolute paths, slashes and backslashes, NUL, over-long names, Unicode
look-alikes and normalisation (fullwidth, combining accents, the Kelvin sign that
lower-cases to ``k``, zero-width and bidi controls), and case-folding collisions.
A name is refused before a path is built from it, and no accepted name, however
built, leads outside its folder on the volume.
"""

from __future__ import annotations

import asyncio
import json
import unicodedata
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from server.adapters import find, list_published
from server.middleware import TenantMiddleware
from trainer.adapter_store import LocalAdapterStore
from trainer.errors import AlreadyExists, InvalidArgument
from trainer.layout import CURRENT, Layout, write_atomic
from trainer.names import (
    MAX_NAME_LEN,
    ServedName,
    check_id,
    check_name,
    check_version,
    fold,
    parse_served_name,
    served_name,
    split_served_name,
)
from trainer.tenants import TenantRegistry

HOSTILE = [
    "",
    ".",
    "..",
    "...",
    "../etc",
    "a/../b",
    "/etc/passwd",
    "/",
    "a/b",
    "a\\b",
    "..\\..\\x",
    "a\x00b",
    "\x00",
    "a\nb",
    "abc\n",
    " abc",
    "abc ",
    "a b",
    ".hidden",
    "-rf",
    "_x",
    "x" * (MAX_NAME_LEN + 1),
    "x" * 10_000,
    "\uff41dmin",  # fullwidth a: NFKC makes it "admin"
    "caf\u00e9",  # composed é
    "cafe\u0301",  # e + combining acute: NFC makes it the same as the one above
    "\u212aelvin",  # Kelvin sign: lower() gives "kelvin"
    "\u017fecret",  # long s: casefold() gives "secret"
    "\u0430dmin",  # Cyrillic a
    "ad\u200bmin",  # zero-width space
    "\u202enimda",  # right-to-left override
    "admin\ufeff",  # BOM
    "%2e%2e",
    "a:b",
    "a*",
    "$(id)",
]


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_hostile_names_are_refused_naming_the_field(name: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as e:
        check_name(name, "adapter_name")
    assert str(e.value).startswith("adapter_name: ")
    layout = Layout(tmp_path / "data")
    # The layout checks before it joins: no path comes back, whichever part is hostile.
    for build in (
        lambda: layout.adapter_dir(name, "ok"),
        lambda: layout.adapter_dir("ok", name),
        lambda: layout.version_dir("ok", name, "v0001"),
        lambda: layout.job_dir(name),
    ):
        with pytest.raises((InvalidArgument, ValueError)):
            build()
    assert not (tmp_path / "data").exists()


@settings(max_examples=400, deadline=None)
@given(name=st.one_of(st.text(), st.sampled_from(HOSTILE).map(lambda s: s + "x")))
def test_any_accepted_name_is_a_plain_folder_name(name: str) -> None:
    try:
        check_name(name, "n")
    except InvalidArgument:
        return
    assert name.isascii() and name.isprintable()
    assert 1 <= len(name) <= MAX_NAME_LEN
    assert "/" not in name and "\\" not in name and "\x00" not in name and ".." not in name
    assert name[0].isalnum()
    # Normalisation and case folding change nothing an accepted name could hide.
    assert unicodedata.normalize("NFKC", name) == name
    assert fold(name) == name.casefold() == name.lower()
    root = Path("/srv/data")
    path = Layout(root).adapter_dir(name, name)
    assert path.parent.parent == root / "adapters" and path.name == name


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text(), st.from_regex(r"(ds|job)-[0-9a-fA-F]{14,18}\n?", fullmatch=True)))
def test_ids_have_one_exact_shape(value: str) -> None:
    try:
        check_id(value, "id")
    except InvalidArgument:
        return
    assert value.startswith(("ds-", "job-")) and len(value.split("-")[1]) == 16
    assert value == value.lower() and value.isascii() and "\n" not in value


def test_case_folding_collisions_are_refused(tmp_path: Path) -> None:
    reg = TenantRegistry(tmp_path / "tenants.json")
    reg.add("acme")
    for twin in ("ACME", "Acme", "aCmE"):
        with pytest.raises(AlreadyExists):
            reg.add(twin)
    for lookalike in ("\u212acme", "\uff41cme", "acm\u0435"):  # Kelvin, fullwidth, Cyrillic e
        with pytest.raises(InvalidArgument):
            reg.add(lookalike)
    assert [t.name for t in reg.list()] == ["acme"]


# ------------------------------------------------------------------ served names


@pytest.mark.parametrize(
    ("model", "parsed"),
    [
        ("A/x", ServedName("A", "x")),
        ("A/x@v0002", ServedName("A", "x", "v0002")),
        ("acme/my-adapter.v2_b@v0001", ServedName("acme", "my-adapter.v2_b", "v0001")),
        ("A/x@v10000", ServedName("A", "x", "v10000")),
        ("A/x@v123456789", ServedName("A", "x", "v123456789")),
    ],
)
def test_served_names_parse_into_tenant_adapter_and_version(model: str, parsed) -> None:
    assert parse_served_name(model) == parsed
    # One spelling per name: the parts give the same string back.
    assert str(parsed) == model
    assert served_name(parsed.tenant, parsed.adapter, parsed.version) == model


MALFORMED_VERSIONED = [
    "A/x@",
    "A/x@x1",
    "A/x@v1",
    "A/x@v001",
    "A/x@v1@v2",
    "A/x@v0001@v0002",
    "A/x@v0001@",
    "A/x@@v0001",
    "A/x@V0001",
    "A/x@0001",
    "A/x@v1234567890",  # longer than any version the store names
    "A/x@v0001 ",
    "A/x@v0001\n",
    "A/x@ v0001",
    "A/x@v0001/",
    "A/x@/v0001",
    "A/x@../v0001",
    "A/x@v0001/../../B/y",
    "A/x@v\u0661\u0662\u0663\u0664",  # Arabic-Indic digits: \d would take them
    "A/x@\uff560001",  # fullwidth v
    "A/x@v\uff10\uff10\uff10\uff11",  # fullwidth digits
    "A@v0001/x",
    "A/@v0001",
    "@v0001",
    "@",
    "A/x/@v0001",
    "A/x/v0001",
    "../A/x@v0001",
    "A/.x@v0001",
    "A/x@latest",
    "A/x@current",
]


@pytest.mark.parametrize(
    "model", MALFORMED_VERSIONED + [h for h in HOSTILE if h != "a/b"], ids=repr
)
def test_malformed_served_names_are_refused(model: str) -> None:
    assert parse_served_name(model) is None
    assert split_served_name(model) is None


def test_split_served_name_keeps_refusing_versioned_names() -> None:
    # Its callers know only the plain form; a versioned name is not one for them.
    assert split_served_name("A/x") == ("A", "x")
    assert split_served_name("A/x@v0001") is None
    assert parse_served_name(None) is None  # type: ignore[arg-type]


def test_versions_are_checked_where_names_are_built() -> None:
    assert check_version("v0001", "version") == "v0001"
    for bad in ("", "v1", "v0001\n", "0001", "v\u0661\u0662\u0663\u0664", "v0001@v0002"):
        with pytest.raises(InvalidArgument) as e:
            check_version(bad, "version")
        assert str(e.value).startswith("version: ")
    with pytest.raises(InvalidArgument):
        served_name("A", "x", "latest")
    with pytest.raises(InvalidArgument):
        served_name("A", "x@v0001")


@settings(max_examples=400, deadline=None)
@given(
    model=st.one_of(
        st.text(max_size=40),
        st.builds(
            lambda name, sep, version: f"{name}{sep}{version}",
            st.sampled_from(["A/x", "A/x@v0001", "A", "A/", "/x", "A/x/", "..", ""]),
            st.sampled_from(["@", "@@", "/", "", "@v0001@"]),
            st.one_of(st.text(max_size=12), st.from_regex(r"v[0-9]{0,11}", fullmatch=True)),
        ),
    )
)
def test_any_accepted_served_name_has_one_spelling_and_safe_parts(model: str) -> None:
    parsed = parse_served_name(model)
    if parsed is None:
        return
    assert str(parsed) == model
    assert check_name(parsed.tenant, "t") == parsed.tenant
    assert check_name(parsed.adapter, "a") == parsed.adapter
    assert model.count("/") == 1 and model.count("@") == (parsed.version is not None)
    if parsed.version is not None:
        assert parsed.version[0] == "v" and parsed.version[1:].isdigit()
        assert parsed.version[1:].isascii() and 4 <= len(parsed.version) - 1 <= 9
    assert (split_served_name(model) is not None) == (parsed.version is None)


# ------------------------------------------------------------------ server side


def _adapter(layout: Layout, folder: Path, base: str = "tiny") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "base_model_name_or_path": base, "r": 8}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    (folder / "adapter_model.safetensors").write_bytes(b"")


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """Two tenants' adapters, and decoys a traversal would reach: outside the volume,
    in the data dir root, and a valid-looking adapter folder under another case."""
    root = tmp_path_factory.mktemp("vol")
    layout = Layout(root / "data").create()
    for tenant, name in (("acme", "secret"), ("bolt", "other")):
        _adapter(layout, layout.version_dir(tenant, name, "v0001"))
        write_atomic(layout.adapter_dir(tenant, name) / CURRENT, b"v0001")
    _adapter(layout, root / "outside" / "v0001")
    (root / "outside" / CURRENT).write_text("v0001")
    _adapter(layout, layout.root / "x" / "v0001")
    (layout.root / "x" / CURRENT).write_text("v0001")
    # A symlinked "adapter" pointing out of the volume.
    (layout.adapters / "acme" / "link").symlink_to(root / "outside")
    return layout


SERVED = {"acme/secret", "bolt/other", "acme/secret@v0001", "bolt/other@v0001"}


@settings(max_examples=400, deadline=None)
@given(
    model=st.one_of(
        st.text(max_size=30),
        st.sampled_from(HOSTILE),
        st.builds(
            lambda a, b, sep: f"{a}{sep}{b}",
            st.sampled_from(["acme", "ACME", "bolt", "..", "", "\uff41cme", "data", "x"]),
            st.sampled_from(["secret", "SECRET", "other", "..", "link", "v0001", "x", ""]),
            st.sampled_from(["/", "//", "/../", "\\", "/./", "%2f"]),
        ),
        st.builds(
            lambda name, version: f"{name}@{version}",
            st.sampled_from(["acme/secret", "bolt/other", "acme/link", "data/x", "acme/../x"]),
            st.sampled_from(["v0001", "v0002", "v1", "", "v0001@v0001", "../v0001", "V0001"]),
        ),
    )
)
def test_resolver_serves_exactly_the_published_names(volume: Layout, model: str) -> None:
    found = find(LocalAdapterStore(volume), model, ["tiny"])
    if model not in SERVED:
        assert found is None, model
        return
    assert found is not None and found.served_name == model
    assert found.path.resolve().is_relative_to(volume.adapters.resolve())


def test_resolver_lists_no_symlink_or_case_twin(volume: Layout) -> None:
    assert [a.served_name for a in list_published(LocalAdapterStore(volume), "acme", ["tiny"])] == [
        "acme/secret"
    ]
    for bad in ("ACME", "..", "acme/..", ""):
        assert list_published(LocalAdapterStore(volume), bad, ["tiny"]) == []


def _middleware_app(layout: Layout) -> Starlette:
    async def generate(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        return JSONResponse({"served": body.get("model")})

    app = Starlette(routes=[Route("/v1/completions", generate, methods=["POST"])])
    app.add_middleware(
        TenantMiddleware, tenants_file=layout.tenants_file, base_model="tiny", data_dir=layout.root
    )
    return app


@pytest.fixture(scope="module")
def gate(volume: Layout):
    reg = TenantRegistry(volume.tenants_file)
    key = reg.add("acme")
    return _middleware_app(volume), key


@settings(max_examples=200, deadline=None)
@given(
    model=st.one_of(
        st.text(max_size=30),
        st.sampled_from(HOSTILE),
        st.sampled_from(["acme/secret", "ACME/secret", "acme/../bolt/other", "\uff41cme/secret"]),
        st.sampled_from(["bolt/other", "acme//secret", "/acme/secret", "acme/secret/", "tiny"]),
        st.sampled_from(["acme/secret@v0001", "acme/secret@v0002", "acme/other@v0001"]),
        st.sampled_from(
            ["bolt/other@v0001", "acme/secret@", "acme/secret@v1@v2", "acme/link@v0001"]
        ),
    )
)
def test_middleware_passes_only_the_base_and_the_callers_own_names(gate, model: str) -> None:
    app, key = gate
    parsed = parse_served_name(model)
    allowed = model in ("", "tiny") or (
        parsed is not None
        and parsed.tenant == "acme"
        # A version is checked against the volume: only the one held passes.
        and (parsed.version is None or model == "acme/secret@v0001")
    )

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post(
                "/v1/completions",
                json={"model": model, "prompt": "x"},
                headers={"Authorization": f"Bearer {key}"},
            )

    r = asyncio.run(go())
    if allowed:
        assert r.status_code == 200 and r.json()["served"] == model
        assert model in ("", "tiny") or model.startswith("acme/")
    else:
        assert r.status_code == 404, (model, r.status_code)
        assert "bolt" not in r.text.replace(model, "") and "other" not in r.text.replace(model, "")
