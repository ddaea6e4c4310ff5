"""`grok download` against a local fake Hugging Face Hub (tests/fake_hub.py): no network."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fake_hub import FakeHub
from grokcli import download as dl

REPO = "xai-org/grok-1"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER = SHARED / "grok1" / "tokenizer.model"


def _tensor_files(folder: str = "ckpt-0", n: int = 4, size: int = 40_000) -> dict[str, bytes]:
    rng = __import__("random").Random(n)
    return {f"{folder}/tensor{i:05d}_000": rng.randbytes(size + 7 * i) for i in range(n)}


@pytest.fixture
def tokenizer_bytes() -> bytes:
    if not TOKENIZER.is_file():
        pytest.skip(f"shared Grok-1 tokenizer not found at {TOKENIZER}")
    return TOKENIZER.read_bytes()


@pytest.fixture
def small_chunks(monkeypatch):
    """Make huggingface_hub write (and so count as resumable) every 8 KiB instead of every 10 MiB."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 8192)


def _run(hub: FakeHub, local: Path, **kw) -> dl.DownloadResult:
    plan = dl.plan_download(REPO, local_dir=local, endpoint=hub.endpoint,
                            include=kw.pop("include", ()), exclude=kw.pop("exclude", ()))
    return dl.download(plan, **kw)


def test_full_download_renames_hub_folder_and_fetches_tokenizer_from_github(tmp_path, monkeypatch, tokenizer_bytes):
    # A later Hub revision with the tensors under another folder name and no tokenizer.model.
    files = _tensor_files("checkpoint") | {"README.md": b"# grok-1\n", ".gitattributes": b"* filter=lfs\n"}
    with FakeHub(REPO, files, raw={"tokenizer.model": tokenizer_bytes}) as hub:
        monkeypatch.setenv("GROK_TOKENIZER_URL", hub.raw_url("tokenizer.model"))
        events: list[dl.DownloadProgress] = []
        result = _run(hub, tmp_path, on_progress=events.append)

    for path, data in files.items():
        if path.startswith("checkpoint/"):
            assert (tmp_path / "ckpt-0" / Path(path).name).read_bytes() == data
    assert (tmp_path / "tokenizer.model").read_bytes() == tokenizer_bytes
    assert not (tmp_path / "README.md").exists() and not (tmp_path / "checkpoint").exists()
    assert sorted(result.fetched) == sorted([f"ckpt-0/tensor{i:05d}_000" for i in range(4)] + ["tokenizer.model"])

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["repo_id"] == REPO and manifest["revision"] == hub.commit
    recorded = {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]}
    for path, data in files.items():
        if path.startswith("checkpoint/"):
            assert recorded[f"ckpt-0/{Path(path).name}"] == (len(data), hashlib.sha256(data).hexdigest())
    assert recorded["tokenizer.model"] == (len(tokenizer_bytes), dl.TOKENIZER_SHA256)

    last = events[-1]
    total = sum(len(d) for p, d in files.items() if p.startswith("checkpoint/")) + len(tokenizer_bytes)
    assert (last.bytes_done, last.bytes_total, last.files_done, last.files_total) == (total, total, 5, 5)


def test_tokenizer_from_the_hub_repo_when_present(tmp_path, tokenizer_bytes):
    files = _tensor_files() | {"tokenizer.model": tokenizer_bytes}
    with FakeHub(REPO, files) as hub:
        _run(hub, tmp_path)
        assert "tokenizer.model" in hub.downloads()
    assert (tmp_path / "tokenizer.model").read_bytes() == tokenizer_bytes


def test_tokenizer_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    with FakeHub(REPO, _tensor_files(), raw={"tokenizer.model": b"not the grok tokenizer" * 100}) as hub:
        monkeypatch.setenv("GROK_TOKENIZER_URL", hub.raw_url("tokenizer.model"))
        monkeypatch.setattr(dl, "TOKENIZER_SIZE", 2200)
        plan = dl.plan_download(REPO, local_dir=tmp_path, endpoint=hub.endpoint)
        with pytest.raises(dl.DownloadError, match="not the pinned"):
            dl.download(plan)
    assert not (tmp_path / "tokenizer.model").exists()
    assert (tmp_path / "ckpt-0" / "tensor00003_000").is_file()  # the rest still arrived


def test_connection_dropped_mid_file_resumes_with_range_and_identical_bytes(tmp_path, small_chunks, tokenizer_bytes):
    files = _tensor_files(size=100_000) | {"tokenizer.model": tokenizer_bytes}
    victim = "ckpt-0/tensor00002_000"
    with FakeHub(REPO, files) as hub:
        hub.drop_after[victim] = 50_000
        _run(hub, tmp_path)
        blob = f"/blobs/{hashlib.sha256(files[victim]).hexdigest()}"
        gets = [r for r in hub.requests if r[0] == "GET" and r[1] == blob]
    assert (tmp_path / victim).read_bytes() == files[victim]
    # The second request continued where the dropped one stopped (a multiple of the write chunk).
    assert len(gets) == 2 and gets[0][2] is None
    resumed_at = int(gets[1][2].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 50_000


def test_interrupted_run_restarts_and_fetches_only_what_is_missing(tmp_path, tokenizer_bytes):
    files = _tensor_files() | {"tokenizer.model": tokenizer_bytes}
    victim = "ckpt-0/tensor00001_000"
    with FakeHub(REPO, files) as hub:
        hub.fail_status[victim] = 500
        failed = r"1 of 5 files failed \(ckpt-0/tensor00001_000: HTTP 500.*run the same command again"
        with pytest.raises(dl.DownloadError, match=failed):
            _run(hub, tmp_path)
        assert not (tmp_path / victim).exists()
        assert not list((tmp_path / ".cache").rglob("*.incomplete"))
        complete = {p: (tmp_path / p).stat().st_mtime_ns for p in files if p != victim}

        del hub.fail_status[victim]
        hub.requests.clear()
        result = _run(hub, tmp_path)
        assert result.fetched == (victim,)
        assert hub.downloads() == [victim]
    for p, data in files.items():
        assert (tmp_path / p).read_bytes() == data
    assert {p: (tmp_path / p).stat().st_mtime_ns for p in complete} == complete  # untouched


def test_truncated_local_file_is_fetched_again(tmp_path, tokenizer_bytes):
    files = _tensor_files() | {"tokenizer.model": tokenizer_bytes}
    with FakeHub(REPO, files) as hub:
        _run(hub, tmp_path)
        victim = tmp_path / "ckpt-0/tensor00000_000"
        victim.write_bytes(victim.read_bytes()[:-10])
        plan = dl.plan_download(REPO, local_dir=tmp_path, endpoint=hub.endpoint)
        assert [f.path for f in plan.to_fetch] == ["ckpt-0/tensor00000_000"]
        dl.download(plan)
    assert victim.read_bytes() == files["ckpt-0/tensor00000_000"]


def test_dry_run_plan_fetches_nothing_and_writes_nothing(tmp_path, tokenizer_bytes):
    files = _tensor_files() | {"tokenizer.model": tokenizer_bytes}
    local = tmp_path / "grok"
    with FakeHub(REPO, files) as hub:
        plan = dl.plan_download(REPO, local_dir=local, endpoint=hub.endpoint)
        assert hub.downloads() == []
        assert all(method == "GET" and path.startswith("/api/") for method, path, _ in hub.requests)
    assert not local.exists()
    assert len(plan.to_fetch) == 5
    assert plan.bytes_to_fetch == sum(len(d) for d in files.values())


def test_include_exclude_select_files(tmp_path, tokenizer_bytes):
    files = _tensor_files() | {"tokenizer.model": tokenizer_bytes}
    with FakeHub(REPO, files) as hub:
        plan = dl.plan_download(REPO, local_dir=tmp_path, endpoint=hub.endpoint,
                                include=["ckpt-0/*"], exclude=["*tensor00003_000"])
        dl.download(plan)
        assert sorted(hub.downloads()) == [f"ckpt-0/tensor{i:05d}_000" for i in range(3)]
        with pytest.raises(dl.DownloadError, match="select none"):
            dl.plan_download(REPO, local_dir=tmp_path, endpoint=hub.endpoint, include=["nothing*"])
    # The manifest still describes the whole checkpoint, so verification sees what is missing.
    manifest = dl.read_manifest(tmp_path / "manifest.json")
    assert {e.path for e in manifest.files} == {f"ckpt-0/tensor{i:05d}_000" for i in range(4)} | {"tokenizer.model"}


def test_disk_space_check_refuses_unless_forced(tmp_path, tokenizer_bytes):
    files = _tensor_files() | {"tokenizer.model": tokenizer_bytes}
    with FakeHub(REPO, files) as hub:
        plan = dl.plan_download(REPO, local_dir=tmp_path / "grok", endpoint=hub.endpoint)
        asked = []

        def tiny_disk(path: Path) -> int:
            asked.append(path)
            return 1000

        with pytest.raises(dl.DownloadError, match=r"not enough disk space.*--force"):
            dl.download(plan, free_space=tiny_disk)
        assert hub.downloads() == [] and not (tmp_path / "grok").exists()
        assert asked == [tmp_path / "grok"]
        dl.download(plan, free_space=tiny_disk, force=True)
    assert (tmp_path / "grok" / "ckpt-0" / "tensor00000_000").is_file()


def test_space_check_counts_only_missing_bytes(tmp_path, tokenizer_bytes):
    files = _tensor_files() | {"tokenizer.model": tokenizer_bytes}
    with FakeHub(REPO, files) as hub:
        _run(hub, tmp_path, exclude=["*tensor00000_000"])
        plan = dl.plan_download(REPO, local_dir=tmp_path, endpoint=hub.endpoint)
        missing = len(files["ckpt-0/tensor00000_000"])
        assert plan.bytes_to_fetch == missing
        dl.download(plan, free_space=lambda p: missing)  # exactly enough


def test_hub_errors_are_one_line(tmp_path):
    with FakeHub(REPO, _tensor_files()) as hub:
        with pytest.raises(dl.DownloadError, match="repository nobody/nothing not found"):
            dl.plan_download("nobody/nothing", local_dir=tmp_path, endpoint=hub.endpoint)
        with pytest.raises(dl.DownloadError, match="revision 'v9' not found"):
            dl.plan_download(REPO, revision="v9", local_dir=tmp_path, endpoint=hub.endpoint)
    with FakeHub(REPO, {"README.md": b"x"}) as hub:
        with pytest.raises(dl.DownloadError, match="no checkpoint tensor files"):
            dl.plan_download(REPO, local_dir=tmp_path, endpoint=hub.endpoint)


def test_hf_endpoint_env_is_honoured(tmp_path, monkeypatch, tokenizer_bytes):
    with FakeHub(REPO, _tensor_files() | {"tokenizer.model": tokenizer_bytes}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        plan = dl.plan_download(REPO, local_dir=tmp_path)
        assert plan.endpoint == hub.endpoint and plan.revision == hub.commit


def test_manifest_reader_rejects_corruption(tmp_path):
    (tmp_path / "manifest.json").write_text('{"files": [{"path": "a", "size": "big"}]}')
    with pytest.raises(dl.CheckpointError, match="corrupted manifest"):
        dl.read_manifest(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text('{"files": [')
    with pytest.raises(dl.CheckpointError, match="not valid JSON"):
        dl.read_manifest(tmp_path / "manifest.json")


def test_sha256sums_is_read_as_a_manifest(tmp_path):
    digest = hashlib.sha256(b"x").hexdigest()
    (tmp_path / "SHA256SUMS").write_text(f"{digest}  ./ckpt-0/tensor00000_000\n{digest.upper()} *tokenizer.model\n")
    m = dl.read_sha256sums(tmp_path / "SHA256SUMS")
    assert [(e.path, e.sha256) for e in m.files] == [("ckpt-0/tensor00000_000", digest), ("tokenizer.model", digest)]
    (tmp_path / "SHA256SUMS").write_text("garbage\n")
    with pytest.raises(dl.CheckpointError, match="not a sha256sum line"):
        dl.read_sha256sums(tmp_path / "SHA256SUMS")


# -- end to end: the project's writer -> fake Hub -> `grok download` -> verify -> load --------


@pytest.fixture
def published_checkpoint(tmp_path) -> dict[str, bytes]:
    """A tiny checkpoint written by the project's writer, as the files of a Hub repo."""
    from test_verify import CFG, train_tokenizer

    from grokcli.checkpoint import random_params, write_checkpoint

    src = tmp_path / "published"
    (tmp_path / "tok.model").write_bytes(train_tokenizer(CFG.vocab_size))
    write_checkpoint(src, random_params(CFG, seed=3), CFG, tokenizer_path=tmp_path / "tok.model")
    files = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    return files | {"README.md": b"# tiny\n"}


def _cli(*args, env=None):
    from typer.testing import CliRunner

    from grokcli import cli

    return CliRunner().invoke(cli.app, list(args), env={"GROK_CONSOLE_WIDTH": "200", **(env or {})},
                              catch_exceptions=False)


def test_cli_download_then_verify_then_load(tmp_path, published_checkpoint):
    from test_verify import CFG

    from grokcli.checkpoint import load_leaf, read_checkpoint
    from grokcli.config import load_config
    from grokcli.params import param_specs

    dest = tmp_path / "grok"
    with FakeHub(REPO, published_checkpoint) as hub:
        env = {"HF_ENDPOINT": hub.endpoint}
        dry = _cli("download", "--local-dir", str(dest), "--dry-run", env=env)
        assert dry.exit_code == 0 and not dest.exists() and hub.downloads() == []
        assert "fetch" in dry.stdout and "ckpt-0/tensor00000_000" in dry.stdout and "dry run" in dry.stderr

        got = _cli("download", "--local-dir", str(dest), env=env)
        assert got.exit_code == 0, got.stderr
        assert got.stdout == "" and "downloaded 28 files" in got.stderr
        assert "README.md" not in hub.downloads()

        again = _cli("download", "--local-dir", str(dest), env=env)
        assert again.exit_code == 0 and "already present" in again.stderr

    verified = _cli("verify-checkpoint", str(dest), "--json")
    assert verified.exit_code == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["ok"] and report["integrity_proven"] and report["failures"] == []
    assert verified.stderr.splitlines()[-1].startswith("OK ")

    assert load_config(dest) == CFG
    params = read_checkpoint(dest, CFG)
    for i, spec in enumerate(param_specs(CFG)):
        want = load_leaf(published_checkpoint[f"ckpt-0/tensor{i:05d}_000"], spec.path)
        have = params[spec.name] if spec.layer is None else params["layers"][spec.layer][spec.name]
        if spec.quantized:
            assert np.array_equal(np.asarray(have.weight), want.weight)
            assert np.array_equal(np.asarray(have.scales).view(np.uint16), want.scales.view(np.uint16))
        else:
            assert np.array_equal(np.asarray(have), want)


def test_cli_verify_exit_codes(tmp_path, published_checkpoint):
    dest = tmp_path / "grok"
    with FakeHub(REPO, published_checkpoint) as hub:
        assert _cli("download", "--local-dir", str(dest), "-q", env={"HF_ENDPOINT": hub.endpoint}).exit_code == 0
    victim = dest / "ckpt-0" / "tensor00002_000"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 4
    victim.write_bytes(bytes(data))
    bad = _cli("verify-checkpoint", str(dest))
    assert bad.exit_code == 1 and bad.stdout == ""
    assert "tensor00002_000" in bad.stderr and "sha256" in bad.stderr and "FAILED" in bad.stderr.splitlines()[-1]
    missing = _cli("verify-checkpoint", str(tmp_path / "nowhere"))
    assert missing.exit_code == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    again = _cli("verify-checkpoint", str(dest), "--write-manifest")
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_cli_download_refuses_without_space(tmp_path, published_checkpoint, monkeypatch):
    monkeypatch.setattr(dl, "free_bytes", lambda path: 10)
    with FakeHub(REPO, published_checkpoint) as hub:
        r = _cli("download", "--local-dir", str(tmp_path / "grok"), env={"HF_ENDPOINT": hub.endpoint})
        assert r.exit_code == 1 and "not enough disk space" in r.stderr and "--force" in r.stderr
        assert "Traceback" not in r.stderr and hub.downloads() == []


# -- hostile hubs: corrupted bytes, names outside --local-dir, stalls, Ctrl-C -----------------


def _flip(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0x01
    return bytes(out)


def test_corrupted_lfs_file_is_refused_never_left_in_place_and_the_next_run_fetches_only_it(tmp_path, tokenizer_bytes):
    files = _tensor_files() | {"tokenizer.model": tokenizer_bytes}
    victim = "ckpt-0/tensor00002_000"
    dest = tmp_path / "grok"
    with FakeHub(REPO, files) as hub:
        hub.corrupt[victim] = _flip(files[victim])  # same size, the listing keeps the real sha256
        got = _cli("download", "--local-dir", str(dest), env={"HF_ENDPOINT": hub.endpoint})
        assert got.exit_code == 1 and "Traceback" not in got.stderr
        [line] = [l for l in got.stderr.splitlines() if l.strip()][-1:]
        assert victim in line and "sha256" in line and "not installed" in line
        assert hub.downloads().count(victim) == 2  # refetched once within the run, then refused
        assert not (dest / victim).exists()
        assert not (dest / ".cache").exists()  # no staged copy left either
        recorded = {e.path: e.sha256 for e in dl.read_manifest(dest / "manifest.json").files}
        assert recorded[victim] is None  # the advertised hash is never recorded for bytes not on disk
        for p, data in files.items():
            if p != victim:
                assert recorded[p] == hashlib.sha256((dest / p).read_bytes()).hexdigest() == \
                    hashlib.sha256(data).hexdigest()

        hub.requests.clear()
        plan = dl.plan_download(REPO, local_dir=dest, endpoint=hub.endpoint)
        assert [f.path for f in plan.to_fetch] == [victim]
        with pytest.raises(dl.DownloadError, match=victim):
            dl.download(plan)
        assert set(hub.downloads()) == {victim}

        del hub.corrupt[victim]
        hub.requests.clear()
        assert _run(hub, dest).fetched == (victim,) and hub.downloads() == [victim]
    assert (dest / victim).read_bytes() == files[victim]


def test_a_file_changed_after_its_hash_was_recorded_is_hashed_again_and_refetched(tmp_path, tokenizer_bytes, monkeypatch):
    files = _tensor_files() | {"tokenizer.model": tokenizer_bytes}
    with FakeHub(REPO, files) as hub:
        _run(hub, tmp_path)
        hashed = []
        real = dl.hash_file
        monkeypatch.setattr(dl, "hash_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
        assert dl.plan_download(REPO, local_dir=tmp_path, endpoint=hub.endpoint).to_fetch == ()
        assert hashed == []  # size and mtime as recorded with the hash: trusted without a read

        victim = tmp_path / "ckpt-0/tensor00001_000"
        victim.write_bytes(_flip(victim.read_bytes()))  # same size, new mtime
        plan = dl.plan_download(REPO, local_dir=tmp_path, endpoint=hub.endpoint)
        assert hashed == ["tensor00001_000"] and [f.path for f in plan.to_fetch] == ["ckpt-0/tensor00001_000"]
        dl.download(plan)
    assert victim.read_bytes() == files["ckpt-0/tensor00001_000"]


@pytest.mark.parametrize("name", ["../outside/ckpt-0/tensor00000_000", "ckpt-0/../../outside/tensor00000_000",
                                  "/tmp/ckpt-0/tensor00000_000", "ckpt-0//tensor00001_000",
                                  "ckpt-0\\..\\..\\tensor00000_000", "a\x1b[2J/tokenizer.model"])
def test_remote_names_outside_the_directory_are_refused_before_any_write(tmp_path, name):
    files = _tensor_files() | {name: b"x" * 2000}
    dest = tmp_path / "inside" / "grok"
    with FakeHub(REPO, files) as hub:
        with pytest.raises(dl.DownloadError, match="refusing to download") as e:
            plan = dl.plan_download(REPO, local_dir=dest, endpoint=hub.endpoint)
            dl.download(plan)
        assert hub.downloads() == []
    assert "\x1b" not in str(e.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # nothing written anywhere


def test_relative_path_rules():
    ok = ["ckpt-0/tensor00000_000", "tokenizer.model", "a/b/c/d"]
    bad = ["", "/etc/passwd", "../x", "a/../b", "./a", "a/", "a//b", "C:/x", "a\\b", "a\0b", "a/" * 9 + "b", "x" * 600, 3]
    assert [dl.relative_path_problem(n) for n in ok] == [None] * len(ok)
    assert all(dl.relative_path_problem(n) for n in bad)


def test_a_server_that_drips_bytes_is_abandoned_at_the_stall_deadline(tmp_path, tokenizer_bytes):
    import time

    files = _tensor_files() | {"tokenizer.model": tokenizer_bytes}
    victim = "ckpt-0/tensor00003_000"
    with FakeHub(REPO, files) as hub:
        hub.drip[victim] = 5.0  # one byte every 5 s: never a read timeout, never done
        plan = dl.plan_download(REPO, local_dir=tmp_path, endpoint=hub.endpoint)
        t0 = time.monotonic()
        with pytest.raises(dl.DownloadError, match=rf"1 of 5 files failed \({victim}: stalled.*in 1 s.*--stall-timeout"):
            dl.download(plan, stall_timeout=1.0)
        assert time.monotonic() - t0 < 10  # the drip alone would take 40,000 x 5 s
    assert not (tmp_path / victim).exists()
    assert all((tmp_path / p).is_file() for p in files if p != victim)  # the others completed


def test_stall_timeout_setting_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("GROK_DOWNLOAD_STALL_TIMEOUT", "soon")
    with pytest.raises(dl.DownloadError, match="GROK_DOWNLOAD_STALL_TIMEOUT"):
        dl.stall_timeout_default()
    monkeypatch.setenv("GROK_DOWNLOAD_STALL_TIMEOUT", "2.5")
    assert dl.stall_timeout_default() == 2.5


def test_ctrl_c_says_it_was_interrupted_and_what_remains(tmp_path, tokenizer_bytes):
    import _thread
    import threading

    files = _tensor_files() | {"tokenizer.model": tokenizer_bytes}
    victim = "ckpt-0/tensor00000_000"
    dest = tmp_path / "grok"
    blob = f"/blobs/{hashlib.sha256(files[victim]).hexdigest()}"
    with FakeHub(REPO, files) as hub:
        hub.drip[victim] = 5.0
        stop = threading.Event()

        def press_ctrl_c_once_only_the_victim_is_left():
            others = [dest / p for p in files if p != victim]
            while not stop.wait(0.05):
                if any(r[1] == blob for r in hub.requests) and all(p.is_file() for p in others):
                    return _thread.interrupt_main()

        presser = threading.Thread(target=press_ctrl_c_once_only_the_victim_is_left, daemon=True)
        presser.start()
        try:
            got = _cli("download", "--local-dir", str(dest), "--stall-timeout", "60",
                       env={"HF_ENDPOINT": hub.endpoint})
        finally:
            stop.set()
    assert got.exit_code == 130 and "Traceback" not in got.stderr
    last = got.stderr.strip().splitlines()[-1]
    assert "interrupted: 1 of 5 files" in last and "run the same command again" in last
    assert not (dest / victim).exists()  # (a staged partial may remain in .cache/: the next run removes it)
    assert (dest / "ckpt-0/tensor00001_000").read_bytes() == files["ckpt-0/tensor00001_000"]
