"""The store's metadata: an embedded sqlite database (WAL) in ``ROOT/metadata.db``.

It maps layers (by diffID and chainID) to their directories, compressed blobs to the
layer they unpack to, and image names to manifests. Writers in several processes are
serialised by sqlite's own locking (``BEGIN IMMEDIATE`` with a busy timeout).
"""

from __future__ import annotations

import _thread
import contextlib
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

from ocistore.fsutil import file_lock

if TYPE_CHECKING:
    import threading

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    diff_id     TEXT PRIMARY KEY,
    dir         TEXT NOT NULL UNIQUE,
    size        INTEGER NOT NULL,       -- bytes of file content in the directory
    entries     INTEGER NOT NULL,
    opaque_root INTEGER NOT NULL,       -- the layer hides every lower layer
    whiteouts   TEXT NOT NULL,          -- 'overlay' or 'oci': how whiteouts sit on disk
    created     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS layer_blobs (
    blob_digest TEXT PRIMARY KEY,       -- a compressed form of the layer
    diff_id     TEXT NOT NULL,
    media_type  TEXT NOT NULL,
    size        INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chains (
    chain_id    TEXT PRIMARY KEY,
    diff_id     TEXT NOT NULL,
    parent      TEXT
);
CREATE TABLE IF NOT EXISTS images (
    name            TEXT PRIMARY KEY,   -- normalised reference, e.g. docker.io/library/ubuntu:22.04
    manifest_digest TEXT NOT NULL,
    manifest_type   TEXT NOT NULL,
    manifest_size   INTEGER NOT NULL,
    index_digest    TEXT,
    config_digest   TEXT NOT NULL,
    platform        TEXT NOT NULL,
    pulled          REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS image_layers (
    name        TEXT NOT NULL REFERENCES images(name) ON DELETE CASCADE,
    position    INTEGER NOT NULL,
    blob_digest TEXT NOT NULL,
    diff_id     TEXT NOT NULL,
    chain_id    TEXT NOT NULL,
    PRIMARY KEY (name, position)
);
CREATE INDEX IF NOT EXISTS image_layers_diff ON image_layers(diff_id);
CREATE TABLE IF NOT EXISTS containers (
    id              TEXT PRIMARY KEY,   -- 64 hex
    name            TEXT NOT NULL UNIQUE,
    image           TEXT NOT NULL,      -- the image's store name when created
    manifest_digest TEXT NOT NULL,      -- what it was created from (the name may move)
    driver          TEXT NOT NULL,      -- 'overlay' or 'copy'
    created         REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS container_layers (
    id          TEXT NOT NULL REFERENCES containers(id) ON DELETE CASCADE,
    position    INTEGER NOT NULL,
    diff_id     TEXT NOT NULL,          -- keeps the layer alive while the container exists
    PRIMARY KEY (id, position)
);
CREATE TABLE IF NOT EXISTS volumes (
    name        TEXT PRIMARY KEY,
    created     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS container_volumes (
    id          TEXT NOT NULL REFERENCES containers(id) ON DELETE CASCADE,
    volume      TEXT NOT NULL REFERENCES volumes(name),
    target      TEXT NOT NULL,
    readonly    INTEGER NOT NULL,
    PRIMARY KEY (id, target)
);
"""
#: What _SCHEMA creates (tables and index): a database that has them all needs no script.
_SCHEMA_OBJECTS = tuple(re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", _SCHEMA))


class LayerRecord(NamedTuple):
    diff_id: str
    dir: str
    size: int
    entries: int
    opaque_root: bool
    whiteouts: str


class ImageLayer(NamedTuple):
    position: int
    blob_digest: str
    diff_id: str
    chain_id: str


class ImageRecord(NamedTuple):
    name: str
    manifest_digest: str
    manifest_type: str
    manifest_size: int
    index_digest: str | None
    config_digest: str
    platform: str
    pulled: float


class VolumeMount(NamedTuple):
    volume: str
    target: str
    readonly: bool


class ContainerRecord(NamedTuple):
    id: str
    name: str
    image: str
    manifest_digest: str
    driver: str
    created: float
    diff_ids: tuple[str, ...]
    volumes: tuple[VolumeMount, ...]


class _Containers:
    """Container and volume rows; mixed into Metadata to keep that class readable."""

    _lock: threading.RLock
    _db: sqlite3.Connection

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def add_container(self, record: ContainerRecord) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO containers(id, name, image, manifest_digest, driver, created)"
                " VALUES(?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.name,
                    record.image,
                    record.manifest_digest,
                    record.driver,
                    record.created,
                ),
            )
            db.executemany(
                "INSERT INTO container_layers(id, position, diff_id) VALUES(?, ?, ?)",
                [(record.id, i, d) for i, d in enumerate(record.diff_ids)],
            )
            db.executemany(
                "INSERT INTO container_volumes(id, volume, target, readonly) VALUES(?, ?, ?, ?)",
                [(record.id, v.volume, v.target, int(v.readonly)) for v in record.volumes],
            )

    def containers(self) -> list[ContainerRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, image, manifest_digest, driver, created FROM containers"
                " ORDER BY created"
            ).fetchall()
            out = []
            for cid, name, image, digest, driver, created in rows:
                layers = tuple(
                    str(d)
                    for (d,) in self._db.execute(
                        "SELECT diff_id FROM container_layers WHERE id=? ORDER BY position",
                        (cid,),
                    )
                )
                volumes = tuple(
                    VolumeMount(str(v), str(t), bool(r))
                    for v, t, r in self._db.execute(
                        "SELECT volume, target, readonly FROM container_volumes WHERE id=?"
                        " ORDER BY target",
                        (cid,),
                    )
                )
                out.append(
                    ContainerRecord(
                        str(cid),
                        str(name),
                        str(image),
                        str(digest),
                        str(driver),
                        float(created),
                        layers,
                        volumes,
                    )
                )
        return out

    def container_name_taken(self, name: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM containers WHERE name=?", (name,)).fetchone()
        return row is not None

    def remove_container(self, cid: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM containers WHERE id=?", (cid,))

    def add_volume(self, name: str, created: float) -> bool:
        """False if the name is taken."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO volumes(name, created) VALUES(?, ?)", (name, created)
            )
            return cur.rowcount == 1

    def volumes(self) -> list[tuple[str, float]]:
        with self._lock:
            rows = self._db.execute("SELECT name, created FROM volumes ORDER BY name").fetchall()
        return [(str(n), float(c)) for n, c in rows]

    def volume_users(self, name: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT c.name FROM container_volumes v JOIN containers c ON c.id = v.id"
                " WHERE v.volume=? ORDER BY c.name",
                (name,),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def remove_volume(self, name: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM volumes WHERE name=?", (name,))


class Metadata(_Containers):
    def __init__(self, path: str) -> None:
        self.path = path
        # What threading.RLock() returns, without importing threading (~1 ms at start-up).
        self._lock = _thread.RLock()
        self._db = sqlite3.connect(
            path, timeout=60.0, isolation_level=None, check_same_thread=False
        )
        if self._ready():
            # Made by an earlier open (WAL mode is kept in the file): only this
            # connection's own settings are left. No lock, no write transaction: a
            # read-only command neither waits for a writer nor makes one wait.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            return
        # Opens are serialised: switching a fresh database to WAL answers "database is
        # locked" at once (no busy timeout) while another process is still creating it.
        with file_lock(path + ".lock"):
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            # One transaction: one WAL sync for the whole schema instead of one per
            # statement (18 fdatasyncs, 10-20 ms of a cold pull), and a crash leaves all
            # of it or none.
            try:
                self._db.executescript(
                    f"BEGIN IMMEDIATE;{_SCHEMA}"
                    "INSERT OR IGNORE INTO meta(key, value) "
                    f"VALUES('schema', '{int(SCHEMA_VERSION)}');COMMIT;"
                )
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _ready(self) -> bool:
        """Whether the database is in WAL mode and holds every table and index of _SCHEMA
        and its schema row (the last thing a first open writes). Any doubt (no such table,
        a lock) answers False, and the open takes the creating path."""
        marks = ", ".join("?" * len(_SCHEMA_OBJECTS))
        try:
            mode, objects, schema = self._db.execute(
                "SELECT (SELECT journal_mode FROM pragma_journal_mode),"
                f" (SELECT count(*) FROM sqlite_master WHERE name IN ({marks})),"
                " (SELECT value FROM meta WHERE key='schema')",
                _SCHEMA_OBJECTS,
            ).fetchone()
        except sqlite3.Error:
            return False
        return bool(mode == "wal" and objects == len(_SCHEMA_OBJECTS) and schema is not None)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    # --- meta ----------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key=?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta_default(self, key: str, value: str) -> str:
        """Set ``key`` unless already set; returns the value in force."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES(?, ?)", (key, value))
            row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0])

    # --- layers --------------------------------------------------------------------------
    def layer(self, diff_id: str) -> LayerRecord | None:
        rows = self._query(
            "SELECT diff_id, dir, size, entries, opaque_root, whiteouts FROM layers "
            "WHERE diff_id=?",
            (diff_id,),
        )
        return _layer(rows[0]) if rows else None

    def layers(self) -> list[LayerRecord]:
        rows = self._query(
            "SELECT diff_id, dir, size, entries, opaque_root, whiteouts FROM layers ORDER BY dir"
        )
        return [_layer(r) for r in rows]

    def add_layer(
        self, record: LayerRecord, blob_digest: str, media_type: str, blob_size: int
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO layers(diff_id, dir, size, entries, opaque_root, whiteouts, created)"
                " VALUES(?, ?, ?, ?, ?, ?, ?)",
                (
                    record.diff_id,
                    record.dir,
                    record.size,
                    record.entries,
                    int(record.opaque_root),
                    record.whiteouts,
                    time.time(),
                ),
            )
            db.execute(
                "INSERT OR REPLACE INTO layer_blobs(blob_digest, diff_id, media_type, size)"
                " VALUES(?, ?, ?, ?)",
                (blob_digest, record.diff_id, media_type, blob_size),
            )

    def add_layer_blob(self, blob_digest: str, diff_id: str, media_type: str, size: int) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO layer_blobs(blob_digest, diff_id, media_type, size)"
                " VALUES(?, ?, ?, ?)",
                (blob_digest, diff_id, media_type, size),
            )

    def layer_blob_sizes(self) -> list[tuple[str, int]]:
        rows = self._query("SELECT blob_digest, size FROM layer_blobs")
        return [(str(d), int(str(n))) for d, n in rows]

    def blob_diff_id(self, blob_digest: str) -> str | None:
        rows = self._query("SELECT diff_id FROM layer_blobs WHERE blob_digest=?", (blob_digest,))
        return str(rows[0][0]) if rows else None

    # --- images --------------------------------------------------------------------------
    def put_image(self, image: ImageRecord, layers: list[ImageLayer]) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM images WHERE name=?", (image.name,))
            db.execute(
                "INSERT INTO images(name, manifest_digest, manifest_type, manifest_size,"
                " index_digest, config_digest, platform, pulled) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    image.name,
                    image.manifest_digest,
                    image.manifest_type,
                    image.manifest_size,
                    image.index_digest,
                    image.config_digest,
                    image.platform,
                    image.pulled,
                ),
            )
            parent: str | None = None
            for layer in layers:
                db.execute(
                    "INSERT INTO image_layers(name, position, blob_digest, diff_id, chain_id)"
                    " VALUES(?, ?, ?, ?, ?)",
                    (image.name, layer.position, layer.blob_digest, layer.diff_id, layer.chain_id),
                )
                db.execute(
                    "INSERT OR IGNORE INTO chains(chain_id, diff_id, parent) VALUES(?, ?, ?)",
                    (layer.chain_id, layer.diff_id, parent),
                )
                parent = layer.chain_id

    def image(self, name: str) -> ImageRecord | None:
        rows = self._query(_IMAGE_SELECT + " WHERE name=?", (name,))
        return _image(rows[0]) if rows else None

    def images(self) -> list[ImageRecord]:
        return [_image(r) for r in self._query(_IMAGE_SELECT + " ORDER BY name")]

    def images_by_digest(self, prefix: str) -> list[ImageRecord]:
        rows = self._query(
            _IMAGE_SELECT + " WHERE manifest_digest LIKE ? OR index_digest LIKE ? ORDER BY name",
            (prefix + "%", prefix + "%"),
        )
        return [_image(r) for r in rows]

    def image_layers(self, name: str) -> list[ImageLayer]:
        rows = self._query(
            "SELECT position, blob_digest, diff_id, chain_id FROM image_layers WHERE name=?"
            " ORDER BY position",
            (name,),
        )
        return [ImageLayer(int(str(p)), str(b), str(d), str(c)) for p, b, d, c in rows]

    def remove_image(self, name: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM images WHERE name=?", (name,))

    def referenced(self) -> tuple[set[str], set[str]]:
        """(blob digests, layer diffIDs) that some image still needs."""
        with self._lock:
            blobs: set[str] = set()
            for row in self._db.execute(
                "SELECT manifest_digest, index_digest, config_digest FROM images"
            ):
                blobs.update(str(d) for d in row if d)
            for (b,) in self._db.execute("SELECT blob_digest FROM image_layers"):
                blobs.add(str(b))
            diff_ids = {str(d) for (d,) in self._db.execute("SELECT diff_id FROM image_layers")}
            # A container keeps its image's layers (and so their directories) alive.
            diff_ids.update(
                str(d) for (d,) in self._db.execute("SELECT diff_id FROM container_layers")
            )
        return blobs, diff_ids

    def remove_layer(self, diff_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM layers WHERE diff_id=?", (diff_id,))
            db.execute("DELETE FROM layer_blobs WHERE diff_id=?", (diff_id,))
            db.execute("DELETE FROM chains WHERE diff_id=?", (diff_id,))


_IMAGE_SELECT = (
    "SELECT name, manifest_digest, manifest_type, manifest_size, index_digest, config_digest,"
    " platform, pulled FROM images"
)


def _layer(row: tuple[object, ...]) -> LayerRecord:
    diff_id, directory, size, entries, opaque, whiteouts = row
    return LayerRecord(
        str(diff_id),
        str(directory),
        int(str(size)),
        int(str(entries)),
        bool(opaque),
        str(whiteouts),
    )


def _image(row: tuple[object, ...]) -> ImageRecord:
    name, manifest, mtype, msize, index, config, plat, pulled = row
    return ImageRecord(
        str(name),
        str(manifest),
        str(mtype),
        int(str(msize)),
        str(index) if index else None,
        str(config),
        str(plat),
        float(str(pulled)),
    )
