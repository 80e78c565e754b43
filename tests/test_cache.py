"""The content-addressed store: only complete artifacts for the exact inputs are ever read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from rag_hpc.index.cache import Artifact, ArtifactStore, artifact_key
from tests import kill_points

REPO = Path(__file__).resolve().parents[1]

FIELDS = {"panel_sha256": "ab" * 32, "window": [3, 1533, 2044], "window_size": 511}


def test_key_changes_with_every_field_and_not_with_their_order():
    base = Artifact("shard", FIELDS).key
    assert Artifact("shard", dict(reversed(list(FIELDS.items())))).key == base
    assert Artifact("donors", FIELDS).key != base
    for name, value in [("panel_sha256", "cd" * 32), ("window", [3, 1533, 2043]), ("window_size", 255)]:
        assert Artifact("shard", {**FIELDS, name: value}).key != base
    assert artifact_key({"a": 1}) != artifact_key({"a": 2})


def test_committed_artifact_reads_back_with_sizes_and_checksums_in_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    art = Artifact("shard", FIELDS)
    assert store.problem(art) == "missing"
    assert store.read(art) is None
    store.commit(art, {"a.bin": b"hello", "b.bin": bytes(range(256))})
    assert store.problem(art) is None
    assert store.read(art) == {"a.bin": b"hello", "b.bin": bytes(range(256))}
    manifest = json.loads((store.path(art) / "manifest.json").read_text())
    assert manifest["key"] == art.key and manifest["fields"] == FIELDS
    assert manifest["files"]["a.bin"]["size"] == 5
    assert len(manifest["files"]["a.bin"]["sha256"]) == 64


def test_truncated_artifact_is_invalid(tmp_path):
    store = ArtifactStore(tmp_path)
    art = Artifact("shard", FIELDS)
    store.commit(art, {"a.bin": b"x" * 1000})
    with open(store.path(art) / "a.bin", "r+b") as fh:
        fh.truncate(500)
    assert "truncated" in store.problem(art)
    assert store.read(art) is None


def test_bit_flip_passes_the_cheap_check_but_is_never_read(tmp_path):
    store = ArtifactStore(tmp_path)
    art = Artifact("shard", FIELDS)
    store.commit(art, {"a.bin": b"\x00" * 1000})
    with open(store.path(art) / "a.bin", "r+b") as fh:
        fh.seek(123)
        fh.write(b"\x01")
    assert store.problem(art) is None  # same size: only the checksum can tell
    assert store.read(art) is None


def test_manifest_for_other_inputs_makes_the_artifact_invalid(tmp_path):
    store = ArtifactStore(tmp_path)
    art = Artifact("shard", FIELDS)
    store.commit(art, {"a.bin": b"data"})
    path = store.path(art) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["fields"]["window_size"] = 255
    path.write_text(json.dumps(manifest))
    assert store.problem(art) == "manifest missing or for other inputs"
    assert store.read(art) is None


def test_recommit_replaces_a_broken_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    art = Artifact("shard", FIELDS)
    store.commit(art, {"a.bin": b"good"})
    (store.path(art) / "manifest.json").write_text("{not json")
    store.commit(art, {"a.bin": b"good"})
    assert store.read(art) == {"a.bin": b"good"}
    assert not list(store.path(art).parent.glob(".trash-*"))


def test_files_follow_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        store = ArtifactStore(tmp_path)
        art = Artifact("shard", FIELDS)
        store.commit(art, {"a.bin": b"x"})
    finally:
        os.umask(old)
    assert (store.path(art) / "a.bin").stat().st_mode & 0o777 == 0o640
    assert store.path(art).stat().st_mode & 0o777 == 0o750


WRITER = r"""
import sys
from rag_hpc.index.cache import Artifact, ArtifactStore
store = ArtifactStore(sys.argv[1])
payload = bytes(range(256)) * (int(sys.argv[2]) // 256)
for n in range(int(sys.argv[3]), int(sys.argv[4])):
    store.commit(Artifact("shard", {"n": n}), {"big.bin": payload, "small.bin": b"tail"})
"""


def test_sigkill_during_commits_never_leaves_a_readable_partial_artifact(tmp_path):
    rng = np.random.default_rng(7)
    store = ArtifactStore(tmp_path)
    size = 8 * 2**20
    published = unpublished = 0
    for trial in range(6):
        first, last = trial * 1000, trial * 1000 + 200
        # The writer SIGKILLs itself (tests/kill_points.py) just before the rename that would publish its
        # k-th artifact: inside the write sequence by construction, whatever the disk's speed.
        k = int(rng.integers(2, 12))
        argv = kill_points.command(
            "rename", "[0-9a-f]{64}", k, "before", "-c", WRITER, str(tmp_path), str(size), str(first), str(last)
        )
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=300, check=False)
        assert proc.returncode == -9, proc.stderr[-2000:]
        trial_published = 0
        for n in range(first, last):
            art = Artifact("shard", {"n": n})
            files = store.read(art)
            if files is None:
                assert store.problem(art) is not None
                unpublished += 1
            else:
                trial_published += 1
                assert len(files["big.bin"]) == size and files["small.bin"] == b"tail"
        assert trial_published == k - 1, (trial, k, trial_published)
        published += trial_published
    assert published > 0 and unpublished > 0  # the kills landed inside the write sequence
    assert store.sweep_stale() >= 1  # the killed writers' temporaries
    assert not list(tmp_path.glob("*/*/.tmp-*"))
    assert store.read(Artifact("shard", {"n": 0})) is not None  # sweeping never touches published ones


def _writer(root: Path, size: int, first: int, last: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(size), str(first), str(last)], stdout=subprocess.PIPE)


def test_two_processes_committing_one_key_leave_one_valid_artifact(tmp_path):
    procs = [_writer(tmp_path, 16 * 2**20, 0, 1) for _ in range(2)]
    assert all(p.wait() == 0 for p in procs)
    store = ArtifactStore(tmp_path)
    files = store.read(Artifact("shard", {"n": 0}))
    assert files is not None and files["small.bin"] == b"tail"
    leftovers = [p.name for p in Path(tmp_path, "shard").rglob(".tmp-*")]
    assert leftovers == []
