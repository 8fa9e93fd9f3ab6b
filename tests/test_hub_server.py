"""The local Hub look-alike (tests/hub_server.py) answers the real huggingface_hub client as the Hub would:
uploads through LFS and regular commits, downloads, branches, tags, listings, auth and the error codes the client
maps to its exceptions. Other tests rely on it, so its behaviour is pinned here."""

import base64
import json
import re
from pathlib import Path

import pytest
from conftest import Hub
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

WEIGHTS = bytes(range(256)) * 12  # binary, 3 KB: LFS because of its .safetensors name, not its size


def make_folder(folder: Path) -> dict[str, bytes]:
    files = {
        "model.safetensors": WEIGHTS,
        "config.json": b'{"n_layer": 2}',
        "notes/readme.txt": b"small text, committed inline",
        "README.md": b"---\nlibrary_name: aksis\ntags:\n- tiny\n---\n# A tiny model\n",
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def status(err: pytest.ExceptionInfo[HfHubHTTPError]) -> int:
    return int(err.value.response.status_code)


def test_create_repo_answers_409_with_its_url_when_it_exists(hub: Hub) -> None:
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    repo_id = hub.fresh_repo_id("created")
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id and url == f"{hub.endpoint}/{repo_id}"
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(repo_id)
    assert status(err) == 409 and err.value.response.json()["url"] == url
    assert api.create_repo(repo_id, exist_ok=True) == url
    assert api.list_repo_files(repo_id) == [".gitattributes"]  # the Hub's initial commit


def test_upload_folder_goes_through_lfs_and_downloads_give_the_same_bytes(hub: Hub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    repo_id = api.create_repo(hub.fresh_repo_id("upload")).repo_id
    files = make_folder(tmp_path / "model")
    start = len(hub.requests)
    commit = api.upload_folder(folder_path=tmp_path / "model", repo_id=repo_id, commit_message="add model")
    assert re.fullmatch(r"[0-9a-f]{40}", commit.oid)

    upload = hub.requests[start:]
    [put] = [r for r in upload if r.method == "PUT"]  # the one LFS file, to the signed URL, without the token
    assert put.body == WEIGHTS and "authorization" not in put.headers
    [commit_request] = [r for r in upload if r.path.endswith("/commit/main")]
    lines = {(op := json.loads(line))["value"].get("path"): op for line in commit_request.body.splitlines()}
    assert lines["model.safetensors"]["key"] == "lfsFile" and lines["model.safetensors"]["value"]["size"] == 3072
    assert base64.b64decode(lines["config.json"]["value"]["content"]) == files["config.json"]
    assert hub.token_leaks(hub.write_token, since=start) == []

    info = api.model_info(repo_id, files_metadata=True)
    assert info.sha == commit.oid
    lfs = {s.rfilename: s.lfs is not None for s in info.siblings or []}
    assert lfs == {".gitattributes": False, **{name: name == "model.safetensors" for name in files}}
    cache = hub.fresh_cache(tmp_path)
    for name, data in files.items():
        assert Path(hf_hub_download(repo_id, name, cache_dir=cache)).read_bytes() == data
    snapshot = Path(snapshot_download(repo_id, cache_dir=hub.fresh_cache(tmp_path)))
    assert {n: (snapshot / n).read_bytes() for n in files} == files

    # Unchanged files are recognised from the oids the server reports: no new commit.
    again = api.upload_folder(folder_path=tmp_path / "model", repo_id=repo_id, commit_message="same again")
    assert again.oid == commit.oid


def test_branches_tags_and_commits_resolve_to_their_own_files(hub: Hub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    repo_id = api.create_repo(hub.fresh_repo_id("revisions")).repo_id
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="weights.txt", repo_id=repo_id).oid
    api.create_branch(repo_id, branch="training-state")
    api.create_branch(repo_id, branch="training-state", exist_ok=True)
    second = api.upload_file(
        path_or_fileobj=b"v2", path_in_repo="weights.txt", repo_id=repo_id, revision="training-state"
    ).oid
    api.create_tag(repo_id, tag="v1", revision=first, tag_message="first weights")

    refs = api.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": first, "training-state": second}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": first}
    expected = {None: b"v1", "training-state": b"v2", "v1": b"v1", first: b"v1", second: b"v2"}
    for revision, data in expected.items():
        path = hf_hub_download(repo_id, "weights.txt", revision=revision, cache_dir=hub.fresh_cache(tmp_path))
        assert Path(path).read_bytes() == data, revision
    assert [c.title for c in api.list_repo_commits(repo_id, revision="training-state")] == [
        "Upload weights.txt with huggingface_hub",
        "Upload weights.txt with huggingface_hub",
        "initial commit",
    ]
    with pytest.raises(HfHubHTTPError) as err:  # parent_commit no longer the head of main
        api.upload_file(path_or_fileobj=b"v3", path_in_repo="w.txt", repo_id=repo_id, parent_commit=second)
    assert status(err) == 412
    api.delete_file("weights.txt", repo_id=repo_id, revision="training-state")
    assert api.list_repo_files(repo_id, revision="training-state") == [".gitattributes"]
    assert api.list_repo_files(repo_id) == [".gitattributes", "weights.txt"]


def test_list_models_filters_on_author_and_the_library_of_the_model_card(hub: Hub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    ours, other, hidden = (hub.fresh_repo_id(n, hub.org) for n in ("ours", "other", "hidden"))
    for repo_id, library, private in ((ours, "aksis", False), (other, "transformers", False), (hidden, "aksis", True)):
        api.create_repo(repo_id, private=private)
        card = f"---\nlibrary_name: {library}\ntags:\n- text-generation\n---\n".encode()
        api.upload_file(path_or_fileobj=card, path_in_repo="README.md", repo_id=repo_id)
    found = {m.id: m for m in api.list_models(author=hub.org, filter="aksis")}
    assert set(found) == {ours, hidden}
    assert found[ours].library_name == "aksis" and found[ours].tags == ["aksis", "text-generation"]
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    assert [m.id for m in anonymous.list_models(author=hub.org, filter="aksis")] == [ours]
    assert [m.id for m in anonymous.list_models(author=hub.org, filter="text-generation")] == sorted([ours, other])
    newest_first = [m.id for m in api.list_models(author=hub.org, filter="aksis", sort="last_modified")]
    assert newest_first == [hidden, ours]
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=ours)
    assert [m.id for m in api.list_models(author=hub.org, filter="aksis", sort="last_modified")] == [ours, hidden]


def test_tokens_are_checked_401_without_a_valid_one_403_outside_your_namespaces(hub: Hub) -> None:
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    assert api.whoami()["name"] == hub.user and hub.org in [o["name"] for o in api.whoami()["orgs"]]
    assert HfApi(endpoint=hub.endpoint, token=hub.other_token).whoami()["auth"]["accessToken"]["role"] == "read"
    repo_id = api.create_repo(hub.fresh_repo_id("guarded")).repo_id
    api.create_repo(hub.fresh_repo_id("team", hub.org))  # alice writes to her org

    cases = [
        (HfApi(endpoint=hub.endpoint, token=False), 401),
        (HfApi(endpoint=hub.endpoint, token="hf_not_a_token"), 401),
        (HfApi(endpoint=hub.endpoint, token=hub.other_token), 403),  # bob, read-only, alice's namespace
    ]
    for client, code in cases:
        with pytest.raises(HfHubHTTPError) as err:
            client.create_repo(hub.fresh_repo_id("intruder"))
        assert status(err) == code and err.value.response.json()["error"]
        with pytest.raises(HfHubHTTPError) as err:
            client.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
        assert status(err) == code
    with pytest.raises(HfHubHTTPError) as err:  # read-only, even in his own namespace
        HfApi(endpoint=hub.endpoint, token=hub.other_token).create_repo(hub.fresh_repo_id("mine", hub.other_user))
    assert status(err) == 403
    with pytest.raises(HfHubHTTPError, match="Invalid credentials"):  # a bad token is refused even for reading
        hf_hub_download(repo_id, ".gitattributes", token="hf_not_a_token")
    assert api.list_repo_files(repo_id) == [".gitattributes"]  # nothing was written


def test_missing_repo_revision_and_file_raise_the_clients_own_errors(hub: Hub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    repo_id = api.create_repo(hub.fresh_repo_id("errors")).repo_id
    cache = hub.fresh_cache(tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{hub.user}/never-created")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{hub.user}/never-created", "config.json", cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("gpt2", "config.json", cache_dir=cache)  # ids without a namespace exist on the Hub, not here
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch", cache_dir=cache)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "config.json", cache_dir=cache)
    codes = [r.status for r in hub.requests[-6:]]
    assert codes == [404] * 6 and not hub.server.errors
    api.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info(repo_id)


def test_a_private_repo_does_not_exist_without_its_owners_token(hub: Hub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    repo_id = api.create_repo(hub.fresh_repo_id("secret"), private=True).repo_id
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)
    assert api.model_info(repo_id).private
    for token in (False, hub.other_token):
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=hub.endpoint, token=token).model_info(repo_id)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(repo_id, "config.json", token=token, cache_dir=hub.fresh_cache(tmp_path))
    path = hf_hub_download(repo_id, "config.json", token=hub.write_token, cache_dir=hub.fresh_cache(tmp_path))
    assert Path(path).read_bytes() == b"{}"


def test_lfs_takes_binary_files_and_files_over_10_mb_as_the_hub_does(hub: Hub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    repo_id = api.create_repo(hub.fresh_repo_id("lfs")).repo_id
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "curve.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(100))  # small, binary
    (folder / "notes.txt").write_text("plain text, " * 2000)  # 24 KB of text: inline
    (folder / "big.txt").write_text("x" * (10 * 1024 * 1024 + 1))  # text over 10 MB
    (folder / "verse.md").write_text("é" * 300)  # UTF-8 cut by the 512-byte sample at a character: still text
    api.upload_folder(folder_path=folder, repo_id=repo_id)
    lfs = {s.rfilename: s.lfs is not None for s in api.model_info(repo_id, files_metadata=True).siblings or []}
    assert lfs == {".gitattributes": False, "curve.png": True, "notes.txt": False, "big.txt": True, "verse.md": False}


def test_card_metadata_is_validated_as_the_hub_validates_it(hub: Hub) -> None:
    from huggingface_hub import ModelCard

    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    repo_id = api.create_repo(hub.fresh_repo_id("card")).repo_id
    ModelCard("---\nlicense: apache-2.0\ntags:\n- aksis\n---\n# ok\n").validate()
    with pytest.raises(ValueError, match='"license" must be one of \\[apache-2.0, mit,'):
        ModelCard("---\nlicense: MIT License\n---\n# no\n").validate()
    with pytest.raises(ValueError, match='Invalid metadata in README.md.\n- "tags" must be an array of strings'):
        api.upload_file(path_or_fileobj=b"---\ntags: {a: 1}\n---\n", path_in_repo="README.md", repo_id=repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes"]  # refused: nothing committed


def test_an_existing_tag_is_a_409_and_injected_failures_reach_the_client(hub: Hub) -> None:
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    repo_id = api.create_repo(hub.fresh_repo_id("conflict")).repo_id
    api.create_tag(repo_id, tag="step-5")
    with pytest.raises(HfHubHTTPError, match="Tag step-5 already exists") as err:
        api.create_tag(repo_id, tag="step-5")
    assert status(err) == 409
    hub.server.fail_next("GET", f"/api/models/{repo_id}$", 429, "Too many requests", headers={"Retry-After": "7"})
    with pytest.raises(HfHubHTTPError) as err:
        api.model_info(repo_id)
    assert status(err) == 429 and err.value.response.headers["Retry-After"] == "7"
    assert err.value.server_message == "Too many requests"
    assert api.model_info(repo_id).id == repo_id  # only the next one failed
