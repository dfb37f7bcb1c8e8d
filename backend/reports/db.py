"""The reports database (``reports.sqlite3`` in the data directory): one file for the DMARC
aggregate reports received and the TLS sessions recorded for TLS-RPT, opened per use (the daemon's
worker threads and the CLI share it; WAL lets a reader run beside the writer)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Iterator

REPORTS_FILE = "reports.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS dmarc_report (
    id          INTEGER PRIMARY KEY,
    org         TEXT NOT NULL,          -- report_metadata/org_name
    report_id   TEXT NOT NULL,          -- report_metadata/report_id, unique per org (RFC 7489 7.2.1.1)
    email       TEXT,
    begin       INTEGER NOT NULL,       -- date_range, Unix time
    end         INTEGER NOT NULL,
    domain      TEXT NOT NULL,          -- policy_published/domain
    policy      TEXT,                   -- policy_published/p
    received    REAL NOT NULL,
    UNIQUE (org, report_id)
);
CREATE TABLE IF NOT EXISTS dmarc_record (
    report        INTEGER NOT NULL REFERENCES dmarc_report(id) ON DELETE CASCADE,
    source_ip     TEXT NOT NULL,
    count         INTEGER NOT NULL,
    disposition   TEXT,                 -- policy_evaluated: none | quarantine | reject
    dkim          TEXT,                 -- policy_evaluated (aligned): pass | fail
    spf           TEXT,
    header_from   TEXT,
    envelope_from TEXT,
    auth_dkim     TEXT NOT NULL,        -- JSON [{domain, selector, result}]: auth_results per domain
    auth_spf      TEXT NOT NULL         -- JSON [{domain, scope, result}]
);
CREATE INDEX IF NOT EXISTS dmarc_record_report ON dmarc_record(report);
CREATE TABLE IF NOT EXISTS tls_policy (
    day           TEXT NOT NULL,        -- UTC date of the sessions (RFC 8460 4.1: one day per report)
    policy_domain TEXT NOT NULL,
    policy_type   TEXT NOT NULL,        -- sts | no-policy-found
    policy_string TEXT NOT NULL,        -- JSON list of the policy's lines ([] without a policy)
    mx_host       TEXT NOT NULL,        -- JSON list of the policy's mx patterns
    successes     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, policy_domain, policy_type, policy_string)
);
CREATE TABLE IF NOT EXISTS tls_failure (
    day           TEXT NOT NULL,
    policy_domain TEXT NOT NULL,
    policy_type   TEXT NOT NULL,
    policy_string TEXT NOT NULL,
    result_type   TEXT NOT NULL,        -- RFC 8460 4.3
    receiving_mx  TEXT NOT NULL,
    receiving_ip  TEXT NOT NULL,
    failures      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, policy_domain, policy_type, policy_string, result_type, receiving_mx, receiving_ip)
);
CREATE TABLE IF NOT EXISTS tls_report_sent (
    day           TEXT NOT NULL,
    policy_domain TEXT NOT NULL,
    outcome       TEXT NOT NULL,        -- queued <id> | no rua | https rua only | ...
    PRIMARY KEY (day, policy_domain)
);
"""


def db_path(data_dir: Path) -> Path:
    return Path(data_dir) / REPORTS_FILE


@contextlib.contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection with the schema in place; one transaction, committed on success."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # Statistics, not mail: a power cut may lose the last commits, and no commit waits for an fsync.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
        with conn:
            yield conn
    finally:
        conn.close()
